"""Faults lose no finished work: a study killed (SIGKILL) or interrupted (Ctrl-C) in the middle of a
trial resumes with the same command, and a trial whose metrics turn NaN or ∞ is recorded as diverged
while the study goes on."""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from bench import config, report_data, report_tables, run, stopping, study, tracking, train
from bench.train import median_epoch
from tests.conftest import shrink_args
from tests.helpers import (
    ONE_THREAD_ENV,
    SEED_STUDY,
    SEEDS,
    _sigint_handled,
    _trials_now,
    a_worker_of,
    another_live_process,
    seed_study_args,
    start_and_catch_a_worker,
    start_and_catch_second_trial,
    wait_until_it_imports_torch,
)


def _state(tmp_path: Path, args: list[str]) -> tuple[list[optuna.trial.FrozenTrial], pd.DataFrame]:
    cfg = config.load(args)
    trials = optuna.load_study(study_name=study.study_name(cfg), storage=study.storage_url(cfg)).get_trials()
    mlflow.set_tracking_uri(config.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.study.name])
    return trials, runs[runs["tags.mlflow.parentRunId"].notna()].set_index("run_id")


def _parent_status(args: list[str]) -> str:
    cfg = config.load(args)
    mlflow.set_tracking_uri(config.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.study.name])
    (status,) = runs[runs["tags.mlflow.parentRunId"].isna()].status
    return status


def _kill_in_the_second_trial(args: list[str], tmp_path: Path) -> None:
    """The study's command, SIGKILLed while its second trial trains (its run RUNNING, as the process left it)."""
    proc = start_and_catch_second_trial(args, tmp_path)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL


def _assert_resumed(tmp_path: Path, args: list[str], before: list[optuna.trial.FrozenTrial],
                    gone: str) -> None:
    """Every variant COMPLETE exactly once, with one FINISHED run; trial 0 kept as it was (not retrained);
    trial 1, cut short, FAIL with its run ended `gone` (never left RUNNING) and run again."""
    trials, runs = _state(tmp_path, args)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["train.seed"] for t in complete) == SEEDS
    assert sorted(runs.loc[t.user_attrs["mlflow_run_id"], "status"] for t in complete) == ["FINISHED"] * 3
    assert (complete[0].number, complete[0].user_attrs["mlflow_run_id"]) == \
        (before[0].number, before[0].user_attrs["mlflow_run_id"])
    cut = trials[1]
    assert cut.state == TrialState.FAIL and cut.user_attrs["status"] in ("killed", "interrupted")
    assert runs.loc[cut.user_attrs["mlflow_run_id"], "status"] == gone
    assert len(runs) == 4 and not (runs["status"] == "RUNNING").any()  # 3 variants + the cut one


def test_sigkill_mid_trial_then_the_same_command_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = seed_study_args(tmp_path)
    _kill_in_the_second_trial(args, tmp_path)
    before, runs = _state(tmp_path, args)
    assert before[1].state == TrialState.RUNNING  # as the dead process left it
    assert runs.loc[before[1].user_attrs["mlflow_run_id"], "status"] == "RUNNING"
    # a report now: the dead worker's trial is killed, not running, and the study says it is not finished
    data = report_data.load(args)
    assert report_tables.trial_table(data).set_index("trial").state.to_dict() == {0: "complete", 1: "killed", 2: "waiting"}
    assert report_data.unfinished_note(data).startswith("Not finished: 1 queued, 1 cut short")

    assert run.main(args) == 0
    _assert_resumed(tmp_path, args, before, gone="KILLED")
    assert report_data.unfinished_note(report_data.load(args)) == ""
    trials, runs = _state(tmp_path, args)
    assert "ended while the trial was running (killed, or its tracking store was lost)" in trials[1].user_attrs["reason"]
    assert runs.loc[trials[1].user_attrs["mlflow_run_id"], "tags.state"] == "killed"


SIGINT_IGNORED = pytest.param(signal.SIG_IGN, id="SIGINT ignored")  # as a shell script's `cmd &` starts it


@pytest.mark.parametrize("sent, sigint, code, said", [
    pytest.param(signal.SIGINT, signal.default_int_handler, 130, "interrupted", id="Ctrl-C"),
    # timeout, docker stop, a scheduler; also where the command started with SIGINT ignored
    pytest.param(signal.SIGTERM, signal.default_int_handler, 143, "terminated (SIGTERM)", id="SIGTERM"),
    pytest.param(signal.SIGTERM, signal.SIG_IGN, 143, "terminated (SIGTERM)", id="SIGTERM, SIGINT ignored")])
def test_ctrl_c_stops_cleanly_then_the_same_command_resumes(sent, sigint, code, said, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = seed_study_args(tmp_path)
    # a job's log (stdout and stderr to one file), where Python buffers stdout unless told otherwise
    job_env = {k: v for k, v in ONE_THREAD_ENV.items() if k != "PYTHONUNBUFFERED"}
    proc = start_and_catch_second_trial(args, tmp_path, env=job_env, sigint=sigint)
    proc.send_signal(sent)
    assert proc.wait(timeout=120) == code, (tmp_path / "run.log").read_text()[-4000:]  # once (CI): 0, the signal lost
    log = (tmp_path / "run.log").read_text()
    assert f"{said}: finished trials are kept; re-run the same command to resume" in log and "Traceback" not in log
    before, runs = _state(tmp_path, args)
    assert before[1].state == TrialState.FAIL and before[1].user_attrs["status"] == "interrupted"
    reason = "terminated (SIGTERM)" if sent == signal.SIGTERM else "interrupted by the user (SIGINT)"
    assert before[1].user_attrs["reason"] == reason
    # the log says what runs, as it runs (the header before the first trial), and what the stop cut short
    assert re.search(r"^study \S+: 3 variants to run$", log, re.MULTILINE).start() < log.index("worker 0: trial 0 "), log
    cut = rf"cut short (in epoch \d+/60|before its first epoch) \({re.escape(reason)}\); trained again when the command"
    assert re.search(rf"^\d\d:\d\d:\d\d worker 0: trial 1 name=bernoulli seed=1: {cut} is re-run$", log, re.MULTILINE), log
    child = runs.loc[before[1].user_attrs["mlflow_run_id"]]
    assert child["status"] == "KILLED" and child["tags.state"] == "interrupted"
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]

    capsys.readouterr()
    assert run.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^study \S+: 2 of the 3 variants to run$", out, re.MULTILINE), out
    assert re.search(r"^ +1 +name=bernoulli seed=1 +interrupted → 3 ", out, re.MULTILINE), out  # the summary: trained again as trial 3
    _assert_resumed(tmp_path, args, before, gone="KILLED")
    # the report counts each variant once, as its last attempt, and still lists the interrupted one
    data = report_data.load(args)
    table = report_tables.family_table(data.runs)
    assert (table.n_trials.sum(), table.n_complete.sum(), table.n_failed.sum()) == (len(SEEDS), len(SEEDS), 0)
    assert sorted(report_tables.trial_table(data).state) == ["complete"] * len(SEEDS) + ["interrupted"]


def test_a_killed_worker_is_named_and_its_trial_marked_killed_by_the_same_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "study.n_workers=2"]
    proc, number, worker = start_and_catch_a_worker(args, tmp_path)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while "its trial is marked killed" not in (tmp_path / "run.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # at once: while the other worker still trains (each has its trials left: 60 epochs of digits)
    assert proc.poll() is None, (tmp_path / "run.log").read_text()
    assert proc.wait(timeout=300) == 1
    log = (tmp_path / "run.log").read_text()
    assert f"(pid {worker}) was killed by SIGKILL" in log and "its trial is marked killed" in log
    trials, runs = _state(tmp_path, args)
    killed = trials[number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["status"] == "killed"  # now, not on a re-run
    assert runs.loc[killed.user_attrs["mlflow_run_id"], "status"] == "KILLED"
    assert sum(t.state == TrialState.COMPLETE for t in trials) == len(SEEDS) - 1  # the other worker went on

    assert run.main(args) == 0  # the same command trains the killed variant again
    trials, _ = _state(tmp_path, args)
    assert sorted(t.params["train.seed"] for t in trials if t.state == TrialState.COMPLETE) == SEEDS


@pytest.mark.parametrize("sigint", [signal.default_int_handler, SIGINT_IGNORED])
def test_workers_stop_when_the_main_process_is_killed(sigint, tmp_path, monkeypatch):
    """Orphaned workers would train on out of reach of Ctrl-C; they end their trials as interrupted."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "study.n_workers=2"]
    proc, number, _ = start_and_catch_a_worker(args, tmp_path, sigint=sigint)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 120
    while True:  # both workers: no trial left running
        trials, _ = _state(tmp_path, args)
        if not any(t.state == TrialState.RUNNING for t in trials):
            break
        assert time.monotonic() < deadline, "a worker trained on for 2 minutes after the main process died"
        time.sleep(0.5)
    assert trials[number].state == TrialState.FAIL and trials[number].user_attrs["status"] == "interrupted"
    assert trials[number].user_attrs["reason"] == "interrupted: the study's main process died (killed, or its " \
        "terminal closed)"
    assert sum(t.state == TrialState.COMPLETE for t in trials) < len(SEEDS)


def test_sigterm_stops_the_workers_of_a_command_started_with_sigint_ignored(tmp_path, monkeypatch):
    """The main process passes SIGTERM on to its workers, which end their trials as terminated."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "study.n_workers=2"]
    proc, number, _ = start_and_catch_a_worker(args, tmp_path, sigint=signal.SIG_IGN)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    log = (tmp_path / "run.log").read_text()
    assert "terminated (SIGTERM): finished trials are kept" in log and "Traceback" not in log
    trials, runs = _state(tmp_path, args)
    assert not any(t.state == TrialState.RUNNING for t in trials) and not (runs.status == "RUNNING").any()
    assert trials[number].state == TrialState.FAIL
    assert (trials[number].user_attrs["status"], trials[number].user_attrs["reason"]) == \
        ("interrupted", "terminated (SIGTERM)")


@pytest.mark.parametrize("kind", ["grid", "search"])
def test_the_studys_command_marks_the_trial_of_a_joining_worker_that_died(kind, tmp_path, monkeypatch, capsys):
    # A `study.worker=true` command on this machine claimed a trial, then was killed: the study's own
    # command, at its end, says so and marks the trial killed, rather than "not ended" for the user to wait
    # on, and does not exit 0 (for a search trial too, which no grid variant's last attempt names)
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    if kind == "search":
        (tmp_path / "search.yaml").write_text("study:\n  n_trials: 2\n  search_space:\n    train.lr: "
                                              "{low: 1.0e-4, high: 1.0e-2, log: true}\ndata:\n  binarize: static\n")
        args = [f"study={tmp_path / 'search.yaml'}", *shrink_args(tmp_path), "eval.figures=false"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    real_work = study.work

    def work_beside_a_dead_joiner(cfg, parent_id, experiment_id, position=0):
        joined = study._claim(study.open_study(cfg, create=False), cfg)
        joined.set_user_attr(study.OWNER, f"{socket.gethostname()}:{dead.pid}")
        return real_work(cfg, parent_id, experiment_id, position)

    monkeypatch.setattr(study, "work", work_beside_a_dead_joiner)
    assert run.main(args) == 1
    err = capsys.readouterr().err
    assert "error: 1 trials of joining workers that died are marked killed; finished trials are kept" in err
    assert "have not ended" not in err
    trials, _ = _state(tmp_path, args)
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["status"] == "killed"
    assert _parent_status(args) == "FAILED"
    monkeypatch.setattr(study, "work", real_work)
    assert run.main(args) == 0
    trials, _ = _state(tmp_path, args)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if kind == "grid":
        assert sorted(t.params["train.seed"] for t in complete) == SEEDS
    else:
        assert len(complete) == 2 and all(study.is_search(t) for t in complete)


def test_a_report_made_while_a_trial_trains_shows_it_running(tmp_path, monkeypatch):
    """`bench.report` during a study: a healthy worker's trial is running, not killed, and counts in no
    family's trials until it ends."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    real_train, trained, seen = study.train, [], []

    def train_and_report(*a, **k):
        trained.append(a)
        if len(trained) == 2:  # the second trial, as it trains
            data = report_data.load(args)
            seen.append((report_tables.trial_table(data).set_index("trial").state.to_dict(),
                         report_data.unfinished_note(data), report_tables.family_table(data.runs)))
        return real_train(*a, **k)

    monkeypatch.setattr(study, "train", train_and_report)
    assert run.main(args) == 0
    ((states_then, note, families),) = seen
    assert states_then == {0: "complete", 1: "running", 2: "waiting"}
    assert note.startswith("Not finished: 1 running"), note
    assert families.n_trials.sum() == families.n_complete.sum() == 1


@pytest.mark.parametrize("state, reason", [("interrupted", "terminated (SIGTERM)"), ("failed", "RuntimeError: a bug")])
def test_the_studys_command_does_not_exit_0_when_a_joining_workers_trial_was_cut_short(state, reason, tmp_path,
                                                                                       monkeypatch, capsys):
    # a joining worker stopped by SIGTERM records its trial interrupted (or it failed): not trained by anyone,
    # so the study's command must not say all is done (it exited 0, its parent run FINISHED)
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    real_work = study.work

    def work_beside_a_stopped_joiner(cfg, parent_id, experiment_id, position=0):
        optuna_study = study.open_study(cfg, create=False)
        joined = study._claim(optuna_study, cfg)
        study._record(optuna_study, joined, state, reason, {})
        return real_work(cfg, parent_id, experiment_id, position)

    monkeypatch.setattr(study, "work", work_beside_a_stopped_joiner)
    assert run.main(args) == 1
    assert f"error: 1 trials were cut short in other processes (trial 0 {state}); finished trials are kept" \
        in capsys.readouterr().err
    assert _parent_status(args) == "FAILED"
    monkeypatch.setattr(study, "work", real_work)
    assert run.main(args) == 0  # the next command trains it
    trials, _ = _state(tmp_path, args)
    assert sorted(t.params["train.seed"] for t in trials if t.state == TrialState.COMPLETE) == SEEDS


def test_a_dead_workers_trial_finds_its_own_run(tmp_path):
    """A worker killed before it named its run to Optuna: the trial's run is found by its study and trial
    number; another trial's (or another study's) run would get this trial's outcome, or a live run marked killed."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = mlflow.create_experiment("s")
    made = {}
    for optuna_study, number in (("s-1", 0), ("s-1", 1), ("s-2", 1), ("s-1", 2)):
        with mlflow.start_run(experiment_id=experiment_id) as r:
            mlflow.set_tags({tracking.OPTUNA_STUDY_TAG: optuna_study, tracking.TRIAL_TAG: number})
        made[optuna_study, number] = r.info.run_id
    for key in (("s-1", 1), ("s-2", 1), ("s-1", 0)):
        assert tracking.run_of_trial(experiment_id, *key) == made[key]
    assert tracking.run_of_trial(experiment_id, "s-1", 3) is None


@pytest.mark.parametrize("fault", ["weights", "test metric"])
def test_a_run_that_goes_non_finite_after_its_last_epoch_is_diverged(tmp_path, monkeypatch, fault):
    # Its epochs' metrics were finite, then its weights are not, or a test metric is ∞ (an image given
    # probability 0): diverged, saying why, not "complete" without test metrics or with an ∞ that a
    # report would leave out of its mean
    monkeypatch.chdir(tmp_path)
    real_train, real_final = study.train, study.final_metrics

    def nan_weights(*args, **kwargs):
        result = real_train(*args, **kwargs)
        with torch.no_grad():
            next(result.model.parameters()).fill_(math.nan)
        return result

    def infinite_nll(*args):
        return {**real_final(*args), "test_iwae_nll": math.inf, "test_bpd": math.inf}

    if fault == "weights":
        monkeypatch.setattr(study, "train", nan_weights)
    else:
        monkeypatch.setattr(study, "final_metrics", infinite_nll)
    path = tmp_path / "one.yaml"
    path.write_text("data:\n  binarize: static\nlikelihood:\n  name: bernoulli\n")
    args = [f"study={path}", *shrink_args(tmp_path)]
    assert run.main(args) == 0
    trials, runs = _state(tmp_path, args)
    (trial,) = trials
    expected = {"weights": "non-finite model parameters",
                "test metric": "non-finite test metrics: test_bpd=inf, test_iwae_nll=inf"}[fault]
    assert trial.state == TrialState.FAIL and trial.user_attrs["status"] == "diverged"
    assert expected in trial.user_attrs["reason"]
    tags = runs.loc[trial.user_attrs["mlflow_run_id"]]
    assert tags["tags.state"] == "diverged" and expected in tags["tags.reason"]
    if fault == "weights":  # no test metric from NaN weights
        assert "metrics.test_elbo" not in runs or pd.isna(tags["metrics.test_elbo"])
    else:  # the finite ones kept, the infinite ones NaN (MLflow would store 1.8e308)
        assert math.isfinite(tags["metrics.test_elbo"]) and math.isnan(tags["metrics.test_iwae_nll"])


def test_non_finite_metrics_mark_the_trial_diverged_and_the_study_goes_on(tmp_path, monkeypatch):
    # A learning rate of 1e10 really does it: the first Adam steps push the weights to ∞, the ELBO to NaN.
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "nan.yaml"
    path.write_text("study:\n  grids:\n    - train.lr: [1.0e+10, 1.0e-3]\n"
                    "data:\n  binarize: static\nlikelihood:\n  name: bernoulli\n")
    args = [f"study={path}", *shrink_args(tmp_path), "train.epochs=3"]
    assert run.main(args) == 0  # a diverged trial has ended for good: not a failure of the study
    trials, runs = _state(tmp_path, args)
    by_lr = {t.params["train.lr"]: t for t in trials}
    diverged, fine = by_lr[1e10], by_lr[1e-3]
    assert diverged.state == TrialState.FAIL and diverged.user_attrs["status"] == "diverged"
    assert "non-finite" in diverged.user_attrs["reason"] and "val_elbo" in diverged.user_attrs["reason"]
    tags = runs.loc[diverged.user_attrs["mlflow_run_id"]]
    assert tags["tags.state"] == "diverged" and "non-finite" in tags["tags.reason"]
    assert tags["status"] == "FAILED"
    # its weights are not finite: no test metric (its "0 active units" looked like a result)
    assert tags[[c for c in runs.columns if c.startswith(("metrics.test_", "metrics.active_units",
                                                           "metrics.anomaly_"))]].isna().all()
    assert fine.state == TrialState.COMPLETE
    assert runs.loc[fine.user_attrs["mlflow_run_id"], ["metrics.test_elbo", "metrics.active_units"]].notna().all()
    assert runs.loc[fine.user_attrs["mlflow_run_id"], "status"] == "FINISHED"
    # diverged is final: the same command does not train it again
    assert run.main(args) == 0
    assert len(_state(tmp_path, args)[0]) == 2


@pytest.mark.parametrize("sent, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, stopping.Terminated),
                                        (signal.SIGHUP, stopping.Orphaned)])  # a worker's main process died
def test_a_stop_inside_a_deferred_block_comes_after_it_also_over_its_error(sent, stop):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    stopping.hang_up_as_orphaned()
    try:
        with pytest.raises(stop), stopping.stops_raise():  # a stop, once come, is raised till the study ends
            with pytest.raises(stop) as raised, stopping.stops_deferred():
                os.kill(os.getpid(), sent)
                for _ in range(100):  # bytecodes, at which Python runs the handler: a deferring one
                    pass
                raise ValueError("a write failed")  # e.g. a worker's storage write, inside the block
            assert type(raised.value) is stop and isinstance(raised.value.__context__, ValueError)
            with stopping.stops_deferred():  # nothing deferred is left to raise after the next block
                pass
        stopping.raise_if_stopped()  # nor once the study has ended
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, previous)
    # the handlers as they were before the study
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (previous, signal.SIG_DFL)


def _real_ctrl_c_at(monkeypatch, args: list[str], name: str, call: int, module=tracking,
                    sent: signal.Signals = signal.SIGINT) -> None:
    """Runs the study with a real SIGINT (or `sent`) sent as `module.<name>` is called for the `call`-th
    time (handled at the next bytecode: inside the wrapper, before that function's writes); the command
    stops as for any Ctrl-C (or SIGTERM)."""
    real, calls = getattr(module, name), []

    def interrupted(*a, **kw):
        calls.append(a)
        if len(calls) == call:
            os.kill(os.getpid(), sent)
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(module, name, interrupted)
        assert run.main(args) == (143 if sent == signal.SIGTERM else 130)


class _SignalledInItsFinalizer:
    """Gets a signal as Python finalizes it, then runs bytecodes, at which Python runs the signal's
    handler: Python prints an exception raised in a finalizer ("Exception ignored in") and drops it.
    `raised` gets what was raised there."""

    def __init__(self, sent: signal.Signals, raised: list[type]):
        self.sent, self.raised = sent, raised

    def __del__(self):
        try:
            os.kill(os.getpid(), self.sent)
            for _ in range(100):
                pass
        except BaseException as e:
            self.raised.append(type(e))
            raise


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["in an epoch", "after the last trial"])
def test_a_stop_that_python_drops_in_a_finalizer_still_stops_the_study(sent, code, when, tmp_path, monkeypatch):
    # A finalizer (a `__del__` of SQLAlchemy's, tqdm's, ...) that runs as the signal comes swallows the
    # handler's KeyboardInterrupt: the study trained on to the end and exited 0 (seen once in CI). The
    # stop is remembered, and raised at the next epoch, or as the study's last trial has ended.
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=3"]
    real_train, real_work, trained, dropped = study.train, study.work, [], []

    def dropped_in_second_trial(cfg, data, on_epoch):
        def on_epoch_then_dropped(epoch, metrics):
            on_epoch(epoch, metrics)
            if len(trained) == 2 and epoch == 1:
                _SignalledInItsFinalizer(sent, dropped)  # finalized at once: no reference kept
        trained.append(cfg)
        return real_train(cfg, data, on_epoch_then_dropped)

    def dropped_after_the_work(*a, **kw):
        outcomes = real_work(*a, **kw)
        _SignalledInItsFinalizer(sent, dropped)
        return outcomes

    printed = []  # by Python's "Exception ignored in" report, sys.unraisablehook
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(unraisable.exc_type))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            if when == "in an epoch":
                patch.setattr(study, "train", dropped_in_second_trial)
            else:
                patch.setattr(study, "work", dropped_after_the_work)
            assert run.main(args) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    assert dropped == [stopping.Terminated if sent == signal.SIGTERM else stopping.Interrupted]
    assert printed == []  # nor the traceback Python prints for it, which would say something went wrong
    trials, runs = _state(tmp_path, args)
    if when == "in an epoch":  # the second trial stopped at its next epoch, recorded as interrupted
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
        assert trials[1].user_attrs["status"] == "interrupted"
        killed = runs.loc[trials[1].user_attrs["mlflow_run_id"]]
        assert killed["status"] == "KILLED" and killed["tags.state"] == "interrupted"
        epochs = mlflow.MlflowClient().get_metric_history(killed.name, "val_elbo")
        assert [m.step for m in epochs] == [1, 2]  # the epoch it came in, and the next
    else:  # every trial had ended; the command still says it was stopped
        assert [t.state for t in trials] == [TrialState.COMPLETE] * len(SEEDS)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_ctrl_c_as_the_command_ends_is_ignored(tmp_path, monkeypatch):
    # One that came after the study's handlers were restored escaped as a traceback (or, for SIGTERM, killed
    # the command by its default action without a word), also in Python's exit handlers after `main`.
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    monkeypatch.setattr(run, "__name__", "__main__")  # as `python -m bench.run` runs it
    real_exit_code, second = stopping.exit_code, []

    def second_ctrl_c(stop):
        second.append(True)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # bytecodes, at which Python runs the handler
            pass
        return real_exit_code(stop)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.setattr(stopping, "exit_code", second_ctrl_c)
        _real_ctrl_c_at(monkeypatch, args, "start_child", call=2)  # returns 130: the second one ignored
        # and so on through Python's exit, which follows at once in the command
        assert second and [signal.getsignal(s) for s in previous] == [signal.SIG_IGN] * 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_ctrl_c_while_a_finished_trial_is_recorded_waits_for_the_record(tmp_path, monkeypatch):
    # A real SIGINT in the middle of recording trial 0 (its MLflow run being closed): the record is
    # finished first (trial COMPLETE, run FINISHED, not RUNNING for the next command to take for a dead
    # worker's and train again), then the command stops as for any Ctrl-C.
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    _real_ctrl_c_at(monkeypatch, args, "finish_child", call=1)
    before, runs = _state(tmp_path, args)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.WAITING, TrialState.WAITING]
    assert before[0].user_attrs["status"] == "complete"
    assert list(runs.status) == ["FINISHED"] and runs["tags.state"].item() == "complete"


def test_ctrl_c_while_a_trial_starts_its_run_waits_for_the_run(tmp_path, monkeypatch):
    # A real SIGINT as the second trial creates its MLflow run: the run is created and its trial names it,
    # then the interruption ends both (run KILLED, trial interrupted), rather than landing inside a write.
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    _real_ctrl_c_at(monkeypatch, args, "start_child", call=2)
    trials, runs = _state(tmp_path, args)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["status"] == "interrupted"
    killed = runs.loc[trials[1].user_attrs["mlflow_run_id"]]
    assert killed["status"] == "KILLED" and killed["tags.state"] == "interrupted"


@pytest.mark.parametrize("name", ["_owner", "trial_params"], ids=["claiming it", "recording its params"])
@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM, SIGINT ignored"])
def test_ctrl_c_while_a_worker_claims_a_trial_is_an_interruption(name, sent, tmp_path, monkeypatch):
    # A real SIGINT as the second trial is claimed (its owner being written; the trial is RUNNING already)
    # or its params recorded: the claim or the record is finished, then the trial recorded as interrupted,
    # not left RUNNING for the next command to take for a dead worker's (nor for a test waiting on a
    # study's running trials); the same command resumes. The same for SIGTERM, with SIGINT ignored as in
    # a shell script's `cmd &`: it waits for the writes too.
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sent == signal.SIGTERM else signal.default_int_handler)
    try:
        _real_ctrl_c_at(monkeypatch, args, name, call=2, module=study, sent=sent)
    finally:
        signal.signal(signal.SIGINT, previous)
    before, runs = _state(tmp_path, args)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert before[1].user_attrs["status"] == "interrupted" and list(runs.status) == ["FINISHED"]
    assert before[1].user_attrs["reason"] == stopping.reason(stopping.Terminated() if sent == signal.SIGTERM
                                                             else KeyboardInterrupt())

    assert run.main(args) == 0
    trials, _ = _state(tmp_path, args)
    assert sorted(t.params["train.seed"] for t in trials if t.state == TrialState.COMPLETE) == SEEDS
    assert trials[1].user_attrs["status"] == "interrupted"  # not relabelled a dead worker's


@pytest.mark.parametrize("where", ["loading its data", "logging its run's params"])
def test_ctrl_c_while_a_trial_sets_up_is_an_interruption(tmp_path, monkeypatch, where):
    # The second trial is interrupted before it has an MLflow run id: recorded as interrupted (not left
    # RUNNING for the next command to take for a dead worker's), no run left RUNNING, and the same
    # command resumes.
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    owner, name = (study._DataCache, "get") if where == "loading its data" else (mlflow, "log_params")
    real, calls = getattr(owner, name), []

    def interrupted_second_time(*a, **kw):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(owner, name, interrupted_second_time)
        assert run.main(args) == 130
    before, runs = _state(tmp_path, args)
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert before[1].user_attrs["status"] == "interrupted" and "mlflow_run_id" not in before[1].user_attrs
    assert sorted(runs.status) == ["FINISHED"] + ["KILLED"] * (where != "loading its data")

    assert run.main(args) == 0
    trials, runs = _state(tmp_path, args)
    assert sorted(t.params["train.seed"] for t in trials if t.state == TrialState.COMPLETE) == SEEDS
    assert trials[1].user_attrs["status"] == "interrupted"  # not relabelled a dead worker's
    assert (runs.status == "FINISHED").sum() == 3 and not (runs.status == "RUNNING").any()


def test_a_command_that_leaves_trials_running_elsewhere_does_not_exit_0(tmp_path, monkeypatch, capsys):
    """Exit 0 says every trial ended: not while another live process still trains one (a command still
    ending, a worker of another command)."""
    monkeypatch.chdir(tmp_path)
    args = ["study=smoke", *shrink_args(tmp_path), "train.epochs=1", "eval.figures=false"]
    assert run.main(args) == 0
    cfg = config.load(args)
    optuna_study = optuna.load_study(study_name=study.study_name(cfg), storage=study.storage_url(cfg))
    elsewhere = optuna_study.ask()  # RUNNING, claimed by another live process of this machine
    with another_live_process() as owner:
        elsewhere.set_user_attr(study.OWNER, f"{socket.gethostname()}:{owner}")
        capsys.readouterr()
        assert run.main(args) == 1
        assert f"trial {elsewhere.number} running in {socket.gethostname()}:{owner}" in capsys.readouterr().err


def _run_patched(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The command run by `script`, which patches bench or a library to fail at one point, then runs it."""
    return subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, capture_output=True, text=True,
                          env=ONE_THREAD_ENV, timeout=600, check=False)


KILLED_WHILE_RECORDING = """
import os, signal, sys
from bench import run, study
record = study._record
def killed_while_recording(optuna_study, trial, *args):
    if trial.number == 1:  # its MLflow run has ended; Optuna has not heard yet
        os.kill(os.getpid(), signal.SIGKILL)
    record(optuna_study, trial, *args)
study._record = killed_while_recording
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_worker_killed_after_its_run_ended_keeps_the_trained_variant(tmp_path, monkeypatch):
    """SIGKILL between the end of a trial's MLflow run and its record in Optuna: the next command gives
    the trial the run's outcome instead of training the variant again."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=2"]
    proc = _run_patched(KILLED_WHILE_RECORDING, args, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    before, runs = _state(tmp_path, args)
    assert before[1].state == TrialState.RUNNING and "status" not in before[1].user_attrs
    run_id = before[1].user_attrs["mlflow_run_id"]
    assert runs.loc[run_id, "status"] == "FINISHED"
    data = report_data.load(args)  # a report now already shows the run's outcome
    assert report_tables.trial_table(data).set_index("trial").state.to_dict() == {0: "complete", 1: "complete", 2: "waiting"}

    assert run.main(args) == 0
    trials, runs = _state(tmp_path, args)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # no fourth trial: nothing trained twice
    assert len(runs) == 3 and (runs.status == "FINISHED").all()
    kept = trials[1]
    assert kept.user_attrs["mlflow_run_id"] == run_id and kept.user_attrs["status"] == "complete"
    assert kept.value == pytest.approx(runs.loc[run_id, "metrics.val_elbo"])
    epochs = sorted(mlflow.tracking.MlflowClient().get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)
    assert kept.user_attrs["samples_per_s"] == pytest.approx(median_epoch([m.value for m in epochs]))  # as reported


def test_a_worker_is_known_by_its_pid_start_time_and_machine():
    optuna_study = optuna.create_study()
    trial = optuna_study.ask()

    def alive(**attrs) -> bool:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return study.worker_alive(optuna_study.get_trials()[0])

    with another_live_process() as worker:
        assert alive(**{study.OWNER: f"{socket.gethostname()}:{worker}", study.MACHINE: study._machine()})
        assert alive(**{study.STARTED: study._process_start(worker)})
        assert not alive(**{study.STARTED: "1"})  # the same pid, started at another time: another process
        # a container of the same hostname: its pids cannot be checked from here, its heartbeats tell
        assert alive(**{study.MACHINE: "another-boot pid:[1]", study.HEARTBEAT: time.time()})
        assert not alive(**{study.HEARTBEAT: time.time() - study.REMOTE_STALE_S - 1})
        assert alive(**{study.MACHINE: None, study.STARTED: None})  # written before they were recorded
    assert not alive(**{study.MACHINE: study._machine()})  # gone
    # this process: alive while it trains the trial, not when an earlier study in it (a notebook's) left it
    assert not alive(**{study.OWNER: study._owner(), study.STARTED: study._process_start(os.getpid())})
    study._TRAINING.add(trial._trial_id)
    try:
        assert alive()
    finally:
        study._TRAINING.discard(trial._trial_id)


def test_a_record_refused_because_another_command_marked_the_trial_killed_warns(capsys):
    """A worker of another machine, silent for REMOTE_STALE_S and marked killed, ends its trial with a
    warning instead of a traceback that would abandon the rest of its queue."""
    optuna_study = optuna.create_study()
    trial = optuna_study.ask()
    optuna_study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # by fail_stale elsewhere
    study._record(optuna_study, trial, "complete", "", {"val_elbo": -90.0, "samples_per_s": 1e4})
    assert f"trial {trial.number} was marked killed by another command" in capsys.readouterr().err
    assert optuna_study.get_trials()[0].state == TrialState.FAIL


SLOW_ENQUEUE = """
import sys, time
import optuna
from bench import run
enqueue = optuna.Study.enqueue_trial
def slow_enqueue(*args, **kwargs):  # widens the moment between reading the trials and adding the missing
    time.sleep(1)
    return enqueue(*args, **kwargs)
optuna.Study.enqueue_trial = slow_enqueue
sys.exit(run.main(sys.argv[1:]))
"""


def test_two_commands_started_at_once_train_each_variant_once(tmp_path, monkeypatch):
    """On fresh stores, each creates them or waits for the other to, then enqueues what is missing, under
    the study's lock: not every variant twice."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=2"]
    with _sigint_handled():
        procs = [subprocess.Popen([sys.executable, "-c", SLOW_ENQUEUE, *args], cwd=tmp_path, env=ONE_THREAD_ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    # 1: a command whose trials ended while the other still trained one says so
    assert all(p.returncode in (0, 1) and "Traceback" not in e for p, e in zip(procs, errors)), errors
    trials, runs = _state(tmp_path, args)
    assert sorted(t.params["train.seed"] for t in trials) == SEEDS
    assert all(t.state == TrialState.COMPLETE for t in trials) and len(runs) == 3
    cfg = config.load(args)
    parents = mlflow.search_runs(experiment_names=[cfg.study.name], filter_string="tags.`mlflow.parentRunId` IS NULL")
    assert len(parents) == 1


CRASHED_WHILE_LOGGING_ARTIFACTS = """
import sys
import mlflow
from bench import run
log_artifacts, calls = mlflow.log_artifacts, []
def disk_full_at_the_second_trial(*args, **kwargs):
    calls.append(args)
    if len(calls) == 2:
        raise OSError(28, "No space left on device")
    return log_artifacts(*args, **kwargs)
mlflow.log_artifacts = disk_full_at_the_second_trial
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_crash_while_a_run_logs_its_artifacts_is_not_taken_for_a_finished_trial(tmp_path, monkeypatch):
    """The command says what failed in one line and ends the run FAILED (MLflow's exit handler would end it
    FINISHED); without its state tag, written last, the next command takes it for what it is, cut short,
    and trains the variant again."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=2"]
    proc = _run_patched(CRASHED_WHILE_LOGGING_ARTIFACTS, args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: OSError: [Errno 28] No space left on device; finished trials are kept; re-run the same " \
           "command to resume" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    before, runs = _state(tmp_path, args)
    assert before[1].state == TrialState.RUNNING
    crashed = before[1].user_attrs["mlflow_run_id"]
    assert runs.loc[crashed, "status"] == "FAILED" and pd.isna(runs.loc[crashed].get("tags.state"))
    assert report_tables.trial_table(report_data.load(args)).set_index("trial").state[1] == "killed"

    assert run.main(args) == 0
    trials, runs = _state(tmp_path, args)
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["status"] == "killed"
    assert (runs.loc[crashed, "status"], runs.loc[crashed, "tags.state"]) == ("KILLED", "killed")
    assert sorted(t.params["train.seed"] for t in trials if t.state == TrialState.COMPLETE) == SEEDS


A_WRITE_FAILS_ONCE = """
import sys
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from bench import run
key = sys.argv.pop(1)
log_batch, runs, failed = SqlAlchemyStore.log_batch, [], []
def fails_once(self, run_id, metrics, params, tags):  # a busy store, a server gone for a moment
    if any(m.key == key for m in metrics):
        if run_id not in runs:
            runs.append(run_id)
        if runs.index(run_id) == 1 and not failed:  # the second trial's first such write
            failed.append(run_id)
            raise MlflowException("database is locked")
    return log_batch(self, run_id, metrics, params, tags)
SqlAlchemyStore.log_batch = fails_once
sys.exit(run.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("key", ["train_elbo", "test_elbo"])  # an epoch's batch (written in the background); the final metrics
def test_a_metric_the_store_did_not_take_is_never_a_complete_run(key, tmp_path, monkeypatch):
    """A write that fails (an epoch's, in EpochLog's writer thread, or the final metrics): the command stops with
    exit 1 before the run is tagged complete, and the next one trains the variant again, so that no run
    counts as complete without its metrics."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=2"]
    proc = _run_patched(A_WRITE_FAILS_ONCE, [key, *args], tmp_path)
    assert proc.returncode == 1 and "database is locked" in proc.stderr, proc.stderr[-3000:]
    before, runs = _state(tmp_path, args)
    assert before[1].state == TrialState.RUNNING and pd.isna(runs.loc[before[1].user_attrs["mlflow_run_id"]].get("tags.state"))

    assert run.main(args) == 0
    trials, runs = _state(tmp_path, args)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["train.seed"] for t in complete) == SEEDS
    assert runs.loc[[t.user_attrs["mlflow_run_id"] for t in complete], "metrics.test_elbo"].notna().all()
    assert trials[1].user_attrs["status"] == "killed"


@pytest.mark.parametrize("lost", ["deleted in the UI", "another tracking store"])
def test_a_stale_trial_whose_run_is_gone_is_trained_again(lost, tmp_path, monkeypatch):
    """The dead worker's run is not in the tracking store (deleted, or the study resumed with another
    store, which the config hash leaves out): the trial is marked killed and trained again, not a
    command that fails every time."""
    monkeypatch.chdir(tmp_path)
    args = seed_study_args(tmp_path)
    _kill_in_the_second_trial(args, tmp_path)
    before, _ = _state(tmp_path, args)  # points MLflow at the study's store
    if lost == "deleted in the UI":
        mlflow.tracking.MlflowClient().delete_run(before[1].user_attrs["mlflow_run_id"])
    else:
        (tmp_path / "new").mkdir()
        args = [*args, f"study.storage=sqlite:///{tmp_path / 'optuna.db'}",
                f"tracking.uri=sqlite:///{tmp_path / 'new' / 'mlflow.db'}"]
    assert run.main(args) == 0
    trials, runs = _state(tmp_path, args)
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["status"] == "killed"
    # every variant complete with its run in the store the report reads: in another store, the finished
    # trial 0 too, whose run is in the first store only
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    in_store = [t for t in complete if t.user_attrs["mlflow_run_id"] in runs.index]
    assert sorted(t.params["train.seed"] for t in in_store) == SEEDS
    assert len(complete) == (4 if lost == "another tracking store" else 3)


@pytest.mark.parametrize("grid_keys", ["in order", "out of order"])  # the runs' variant tags have them in order
def test_finished_runs_are_taken_back_not_trained_again_when_the_optuna_storage_is_lost(grid_keys, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    if grid_keys == "out of order":
        (tmp_path / "seeds.yaml").write_text(SEED_STUDY.replace("data: {binarize: static}\n", "").replace(
            "- likelihood.name: [bernoulli]", "- likelihood.name: [bernoulli]\n      data.binarize: [static]"))
    assert run.main(args) == 0
    before, runs_before = _state(tmp_path, args)
    (tmp_path / "optuna.db").unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(study, "train", no_training)
    assert run.main(args) == 0
    trials, runs = _state(tmp_path, args)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(SEEDS)
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trials) == sorted(runs.index) == sorted(runs_before.index)
    assert [t.value for t in trials] == pytest.approx([t.value for t in before])  # the runs' validation ELBO
    for key in ("comparable", "comparable_scale"):  # what the console's summary and the report read
        assert [t.user_attrs[key] for t in trials] == [t.user_attrs[key] for t in before], key
    # the report counts each seed once
    table = report_tables.family_table(report_data.load(args).runs)
    assert (table.n_trials.sum(), table.n_complete.sum()) == (len(SEEDS), len(SEEDS))


def test_the_run_of_a_trial_the_lost_storage_held_is_ended_killed_not_left_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = seed_study_args(tmp_path)
    _kill_in_the_second_trial(args, tmp_path)
    before, _ = _state(tmp_path, args)
    orphan = before[1].user_attrs["mlflow_run_id"]
    (tmp_path / "optuna.db").unlink()
    assert run.main(args) == 0
    _, runs = _state(tmp_path, args)
    assert (runs.loc[orphan, "status"], runs.loc[orphan, "tags.state"]) == ("KILLED", "killed")
    assert not (runs.status == "RUNNING").any()
    assert "running" not in set(report_tables.trial_table(report_data.load(args)).state)


def test_a_variant_trained_twice_counts_once_in_the_report():
    runs = pd.DataFrame({"variant": ["seed=0", "seed=0", "seed=1", ""], "state": ["complete"] * 4,
                         "start_time": pd.to_datetime([2, 1, 3, 4], unit="s")})
    kept = report_tables.last_attempts(runs)
    assert list(kept.index) == [0, 2, 3]  # the later run of seed=0; a run with no variant is kept


STORAGE_LOST_IN_THE_SECOND_TRIAL = """
import sys
import optuna
from bench import run
set_user_attr = optuna.trial.Trial.set_user_attr
def storage_gone(trial, key, value):
    if trial.number == 1 and key == "heartbeat":  # as Optuna wraps SQLAlchemy's error, with a guess of its own
        raise optuna.exceptions.StorageInternalError(
            "An exception is raised during the commit. This typically happens due to invalid data in the commit, "
            "e.g. exceeding max length.") from ConnectionError("could not connect to server: Connection refused")
    return set_user_attr(trial, key, value)
optuna.trial.Trial.set_user_attr = storage_gone
sys.exit(run.main(sys.argv[1:]))
"""


TRACKING_TABLE_LOST_IN_THE_SECOND_TRIAL = """
import sqlite3, sys
from bench import config, run, tracking
start_child, calls = tracking.start_child, []
def table_gone(cfg, *args):
    calls.append(args)
    if len(calls) == 2:  # the store answers with a database error, as a lost server's does
        with sqlite3.connect(tracking.sqlite_path(config.tracking_uri(cfg))) as db:
            db.execute("DROP TABLE tags")
    return start_child(cfg, *args)
tracking.start_child = table_gone
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_database_error_of_the_tracking_store_is_one_line(tmp_path, monkeypatch):
    """MLflow logs the error with its traceback before raising it; the command's own line says it all."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    proc = _run_patched(TRACKING_TABLE_LOST_IN_THE_SECOND_TRIAL, args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: MLflow tracking failed ((sqlite3.OperationalError) no such table: tags); finished" in proc.stderr
    assert "Traceback" not in proc.stderr and "SQLAlchemy database error" not in proc.stderr, proc.stderr[-3000:]


def test_a_lost_optuna_storage_stops_the_command_and_the_next_resumes(tmp_path, monkeypatch):
    """Not the variant's failure (which would be recorded, and never trained again): the command says the
    storage failed and exits 1; the next one trains the variant."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=2"]
    proc = _run_patched(STORAGE_LOST_IN_THE_SECOND_TRIAL, args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: the Optuna storage failed (could not connect to server: Connection refused); finished " \
           "trials are kept; re-run the same command to resume" in proc.stderr and "Traceback" not in proc.stderr
    before, _ = _state(tmp_path, args)
    assert before[0].state == TrialState.COMPLETE and before[1].state == TrialState.RUNNING

    assert run.main(args) == 0
    trials, _ = _state(tmp_path, args)
    assert trials[1].user_attrs["status"] == "killed"
    assert sorted(t.params["train.seed"] for t in trials if t.state == TrialState.COMPLETE) == SEEDS


def test_a_run_killed_between_its_state_tag_and_its_end_counts_as_recorded(tmp_path):
    # finish_child writes the state tag last: a run that has it holds everything, and is ended as it says
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.log_metric(run_id, "val_elbo", -90.0)
    assert tracking.ended_run(run_id) is None  # no state tag: not recorded in full
    client.set_tag(run_id, "state", "complete")
    assert tracking.ended_run(run_id)[0] == "complete" and client.get_run(run_id).info.status == "RUNNING"
    state, _, last = tracking.ended_run(run_id, mend=True)
    assert (state, last["val_elbo"], client.get_run(run_id).info.status) == ("complete", -90.0, "FINISHED")


DIES_MID_TRANSACTION = r"""
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")  # the transaction's pages spill to the file: its journal is hot
db.execute("BEGIN")
db.execute("UPDATE tags SET value = 'x'")
os._exit(0)  # a crash, a power loss
"""


def test_a_store_left_with_a_hot_journal_is_recovered_not_refused(tmp_path, monkeypatch):
    # a writer that died mid-transaction leaves a journal that a read-only connection cannot roll back:
    # the store was refused as unreadable (exit 2), inviting its deletion
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    assert run.main(args) == 0
    store = tmp_path / "mlflow.db"
    subprocess.run([sys.executable, "-c", DIES_MID_TRANSACTION, str(store)], check=True)
    assert Path(f"{store}-journal").exists()
    assert report_data.load(args).runs.shape[0] == len(SEEDS)  # the report reads it
    assert not Path(f"{store}-journal").exists()
    assert run.main(args) == 0  # and the study's command takes it


@pytest.mark.parametrize("call", [3, 40])  # in MLflow's first migration; in a later one
def test_ctrl_c_while_a_new_store_is_made_waits_for_it(call, tmp_path, monkeypatch, capsys):
    """A real SIGINT while MLflow makes its schema in a new mlflow.db: the store is made first, then the
    command stops as for any Ctrl-C. Cut short, the file was left half made, and every later command in
    the folder failed on it."""
    from alembic.operations import Operations

    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    real, calls = Operations.create_table, []

    def interrupted(*a, **kw):  # SIGINT right after a table is made, before the migration records it
        table = real(*a, **kw)
        calls.append(a)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return table

    with monkeypatch.context() as patch:
        patch.setattr(Operations, "create_table", interrupted)
        assert run.main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert run.main(args) == 0, capsys.readouterr().err  # the same command resumes in that folder
    assert len(calls) > call  # the migration went on after the signal
    trials, runs = _state(tmp_path, args)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and len(runs) == 3


def test_ctrl_c_while_the_studys_parent_run_is_made_ends_it_killed(tmp_path, monkeypatch, capsys):
    """The parent run is made before any trial (its config logged as an artifact): a stop then left it
    RUNNING in the MLflow UI until the next command."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    real = MlflowClient.log_artifact

    def interrupted(self, *a, **kw):  # SIGINT while the parent run's config is uploaded
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_artifact", interrupted)
        assert run.main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    cfg = config.load(args)
    mlflow.set_tracking_uri(config.tracking_uri(cfg))
    parents = mlflow.search_runs(experiment_names=[cfg.study.name])
    assert list(parents.status) == ["KILLED"]
    assert run.main(args) == 0  # the same command finds it again
    trials, runs = _state(tmp_path, args)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 and len(runs) == 3


def test_a_half_made_tracking_store_is_named_as_mlflows_with_what_to_do(tmp_path, monkeypatch, capsys):
    """One cut short before the fix above, or by a SIGKILL: the error names MLflow's store, not Optuna's
    storage, and says it can be deleted when it holds no runs."""
    from alembic.operations import Operations
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    real = Operations.create_table

    def killed(*a, **kw):  # the process dies right after a table is made
        real(*a, **kw)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Operations, "create_table", killed)
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    assert run.main(seed_study_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "error: MLflow tracking failed (its database could not be read or set up" in err
    assert f"if {tmp_path / 'mlflow.db'} holds no runs, delete it" in err and "Optuna" not in err


def test_ctrl_c_before_the_study_starts_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted(*a, **kw):  # as if Ctrl-C came while the config is read and checked
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "preflight", interrupted)
    args = seed_study_args(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert run.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was written" in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")


@LINUX_PROC
@pytest.mark.parametrize("command", [["-m", "bench.run"], ["-mbench.run"], ["-um", "bench.run"]])  # as Python reads
def test_ctrl_c_while_the_command_imports_exits_130_in_one_line(command, tmp_path):
    """A Ctrl-C in the seconds the command imports torch and MLflow: one line, not an import's traceback."""
    args = seed_study_args(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with _sigint_handled():
        proc = subprocess.Popen([sys.executable, *command, *args], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=ONE_THREAD_ENV)
    wait_until_it_imports_torch(proc.pid)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    if proc.poll() is None:  # a second Ctrl-C while half-imported torch shuts down: no signal's own death (-2)
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert (proc.returncode, out) == (130, "\ninterrupted: nothing was written\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_another_module_run_with_dash_m_that_imports_bench_keeps_its_own_ctrl_c(tmp_path):
    """Only `python -m bench.run`/`bench.report` get the one-line stop while importing: a user's package
    that imports bench under `python -m` keeps Python's KeyboardInterrupt, which bench's stops build on."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("import bench\n")
    (tmp_path / "mypkg" / "loop.py").write_text(
        "import time\ntry:\n    print('ready', flush=True)\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    print('its own handler')\n")
    with _sigint_handled():
        proc = subprocess.Popen([sys.executable, "-m", "mypkg.loop"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=ONE_THREAD_ENV)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, "its own handler\n")


@LINUX_PROC
@pytest.mark.parametrize("background", [False, True], ids=["foreground", "a shell script's cmd &"])
def test_ctrl_c_while_a_worker_starts_stops_it_without_a_traceback(background, tmp_path, monkeypatch):
    """A terminal's Ctrl-C reaches the whole process group, where a spawned worker stays while it imports
    torch and MLflow: it waits for the worker to be ready, which then stops without starting a trial. A
    command started with SIGINT ignored (a shell script's `cmd &`) ignores it, its workers too."""
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "study.n_workers=2"]
    with open(tmp_path / "run.log", "w") as log, _sigint_handled(signal.SIG_IGN if background else
                                                                 signal.default_int_handler):
        proc = subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, env=ONE_THREAD_ENV, start_new_session=True)
    wait_until_it_imports_torch(a_worker_of(proc.pid))
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == (0 if background else 130)
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" not in log, log
    cfg = config.load(args)
    trials = optuna.load_study(study_name=study.study_name(cfg), storage=study.storage_url(cfg)).get_trials()
    mlflow.set_tracking_uri(config.tracking_uri(cfg))
    runs = mlflow.search_runs(experiment_names=[cfg.study.name])
    if background:
        assert [t.state for t in trials] == [TrialState.COMPLETE] * len(SEEDS) and len(runs) == len(SEEDS) + 1
        return
    assert "interrupted: finished trials are kept" in log
    # the parent run only: no trial had started
    assert [t.state for t in trials] == [TrialState.WAITING] * len(SEEDS) and list(runs.status) == ["KILLED"]


def test_a_long_test_set_iwae_gives_signs_of_life_to_the_optuna_storage(tmp_path, monkeypatch):
    """k = 5000 on the whole test split takes hours: a trial silent for REMOTE_STALE_S would be marked killed
    by a command on another machine. The heartbeat is written between batches of the IWAE's images (at
    most every HEARTBEAT_S: here, each time)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "HEARTBEAT_S", 0)
    iwae, seen = train.iwae, []

    def watched(*args, **kwargs):  # the heartbeat in the storage as each batch starts
        seen.append({number: beat for number, *_, beat in _trials_now(tmp_path, study.HEARTBEAT)}[0])
        return iwae(*args, **kwargs)

    monkeypatch.setattr(train, "iwae", watched)
    assert run.main([*seed_study_args(tmp_path), "study.seeds=[0]", "train.epochs=1", "eval.iwae_examples=300"]) == 0
    assert len(seen) == 3 and len(set(seen)) == 3, seen


def test_a_ctrl_c_that_a_library_turns_into_another_error_is_still_an_interruption(tmp_path, monkeypatch):
    # OmegaConf, inside the config calls of a trial's start, turns a KeyboardInterrupt raised in it into an
    # AttributeError 1 time in 8: the command ended with its traceback (exit 1), the trial and parent run RUNNING
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    real_apply, calls = config.apply, []

    def apply_interrupted_in_the_second_trial(*a, **kw):
        if sys._getframe(1).f_code.co_name == "run_trial":
            calls.append(True)
            if len(calls) == 2:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(100):  # bytecodes, at which Python runs the handler
                        pass
                except KeyboardInterrupt:
                    raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'") from None
        return real_apply(*a, **kw)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(config, "apply", apply_interrupted_in_the_second_trial)
        assert run.main(args) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    trials, _ = _state(tmp_path, args)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["status"] == "interrupted"
    every_run = mlflow.search_runs(experiment_names=[config.load(args).study.name])
    assert not (every_run.status == "RUNNING").any()  # the parent run ended KILLED; the trial had no run yet


def test_a_ctrl_c_after_the_last_trial_ends_the_parent_run_killed(tmp_path, monkeypatch):
    # it came outside the part of the command that ends the parent run: left RUNNING, a study in progress
    # with no process behind it in the MLflow UI until the next command
    monkeypatch.chdir(tmp_path)
    args = [*seed_study_args(tmp_path), "train.epochs=1"]
    _real_ctrl_c_at(monkeypatch, args, "cut_short", call=1, module=study)
    every_run = mlflow.search_runs(experiment_names=[config.load(args).study.name])
    assert sorted(every_run.status) == ["FINISHED"] * len(SEEDS) + ["KILLED"]  # the trials', the parent's


def test_a_study_does_not_inherit_a_stop_left_over_from_the_one_before(monkeypatch):
    # one that came in the microseconds while the last study put its handlers back stopped the next at once
    monkeypatch.setattr(stopping, "_stopped", KeyboardInterrupt)
    with stopping.stops_raise():
        stopping.raise_if_stopped()
