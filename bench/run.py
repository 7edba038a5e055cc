"""The main job: `python -m bench.run study=NAME [key=value ...]`; from Python (a notebook, a script),
`bench.run.run_study(["study=NAME", "key=value", ...])`, which raises where the command exits non-zero.

It loads and validates the config; checks every input (data, stores) before writing anything; creates
the MLflow experiment, the Optuna study and its parent run once; enqueues the variants that are missing;
trains them with one or more workers; prints the summary; writes the study's report (as `python -m
bench.report` with the same arguments; not with report=false, nor in a joining worker, study.worker=true,
whose study's own command writes it).
Results, by default in the current folder: MLflow runs in mlflow.db (tracking.uri) with their artifacts
in mlartifacts/, Optuna trials in optuna.db (study.storage), the report in reports/<study>/ (report_dir).
Exit codes: 0 all trials ended (complete, pruned or diverged); 1 a trial failed for another reason, a
worker died, trials are still running in other processes, the tracking store or the Optuna storage
was lost, or the report could not be written; 2 bad input (nothing written); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM, stopped as Ctrl-C stops it). After 1, 130 or 143, or a killed
process, re-running the same command resumes: finished trials are kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

import bench
from bench import config, report, states, stopping, study, tracking
from bench import data as data_mod
from bench.config import Config, ConfigError
from bench.train import resolve_device

# After a stop, a lost store, a dead worker or a trial cut short: the trial in progress is left to the next
# command, which marks it killed or interrupted (its owner is gone) and trains that variant again.
RESUME_HINT = "finished trials are kept; re-run the same command to resume"
LOST_STORAGE = "the Optuna storage failed"  # with the error behind Optuna's, whose own text guesses "invalid data"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else _arguments(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip(), config.help_text(), sep="\n\n")
        return 0
    try:
        cfg = checked(argv)
    except ConfigError as e:
        print(f"error: {config.redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # before anything is written
        _ending()
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return stopping.exit_code(stop)
    try:
        _, ok = execute(cfg, argv)
    except KeyboardInterrupt as stop:
        _ending()
        said = "terminated (SIGTERM)" if stopping.signum(stop) == signal.SIGTERM else "interrupted"
        print(f"\n{said}: {RESUME_HINT}", file=sys.stderr)
        return stopping.exit_code(stop)
    except (MlflowException, *study.STORAGE_ERRORS, OSError) as e:
        print(f"error: {_lost_store(e)}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def checked(argv: list[str]) -> Config:
    """The config of these arguments, with every check that bad input can fail (ConfigError) done."""
    cfg = config.load(argv)
    preflight(cfg)
    return cfg


def preflight(cfg: Config) -> None:
    """Every check that bad input can fail, before a run, a study or a file is written."""
    if not cfg.study.name:
        raise ConfigError(f"study=NAME is required; valid choices: {', '.join(config.available_studies())}")
    if mlflow.active_run() is not None:  # the trials' runs are the study's parent run's children
        raise ConfigError(f"an MLflow run ({mlflow.active_run().info.run_id}) is active in this process: end it "
                          "(mlflow.end_run()) before running a study, whose runs are children of its own parent run")
    if os.environ.get("MLFLOW_RUN_ID"):  # as `mlflow run` sets it: MLflow would make the first trial's run that one
        raise ConfigError(f"$MLFLOW_RUN_ID={os.environ['MLFLOW_RUN_ID']!r} is set (as `mlflow run` sets it): the "
                          "first trial would log into that run instead of a child of the study's; unset it")
    try:
        resolve_device(cfg.train.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    tracking.check_artifact_location(cfg)
    tracking.check_reachable(config.tracking_uri(cfg), config.tracking_key(cfg))
    study.check_storage(cfg)
    # the report's own folder, not only report_dir: a file in its place was found after hours of training
    report_folder = Path(cfg.report_dir) / report.safe_name(cfg.study.name)
    config.check_writable("report_dir", cfg.report_dir, report_folder if cfg.report else Path(cfg.report_dir),
                          create=True)
    seen = set()
    for params in study.variants(cfg) or [{}]:
        data_cfg = config.apply(cfg, params).data
        if repr(data_cfg) not in seen:  # fails with the expected files and the offline alternatives
            seen.add(repr(data_cfg))
            data_mod.load(data_cfg)


def execute(cfg: Config, argv: list[str]) -> tuple[pd.DataFrame, bool]:
    """Runs a checked study, prints its summary and writes its report; returns the summary and whether
    every trial ended and the report was written."""
    print(config.to_yaml(cfg))
    varied = sorted({"train.seed", *cfg.study.search_space, *(key for grid in cfg.study.grids for key in grid)})
    print(f"# set per variant by study.seeds, grids and search_space (not the values above): {', '.join(varied)}\n")
    try:
        with stopping.stops_raise():
            ok = run(cfg)
            table = summary(cfg)
    except BaseException:
        _end_runs_left_open()
        raise
    print(_printed(table).to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="—")
          if len(table) else "no trials")
    url = tracking.experiment_url(cfg)
    relative = any(not path.is_absolute() for path in _sqlite_files(cfg))
    print(config.redact(f"MLflow: {config.tracking_uri(cfg)} (experiment {cfg.study.name!r}{', ' + url if url else ''}); "
                        f"Optuna: {study.storage_url(cfg)}" + (f" (in {Path.cwd()})" if relative else "")))
    if cfg.report and not cfg.study.worker:  # failed trials too: the report lists them with their reasons
        ok = _report(argv) and ok
    return table, ok


def _sqlite_files(cfg: Config) -> list[Path]:
    """The SQLite files of the tracking store and the Optuna storage (none for a server or a database)."""
    paths = (tracking.sqlite_path(config.tracking_uri(cfg)), tracking.sqlite_path(study.storage_url(cfg)))
    return [path for path in paths if path is not None]


def run(cfg: Config) -> bool:
    """Runs the study; returns False when a trial failed for a reason other than divergence, a worker
    died, or trials of the study have not ended (running in other processes, or still queued)."""
    ok, workers, parent_id, idle = True, [], None, False
    try:
        # Two commands started at once: the stores created once (two processes creating one SQLite file crash
        # MLflow and Optuna), each variant enqueued once, one parent run.
        with study.study_lock(cfg):
            # A stop while MLflow or Optuna makes its schema in a new SQLite file (seconds) would leave the file
            # half made, refused by every later command in the folder: it waits for the stores to be made.
            new_file = any(not path.exists() for path in _sqlite_files(cfg))
            with stopping.stops_deferred() if new_file else contextlib.nullcontext():
                experiment_id = tracking.setup(cfg)
                optuna_study = study.open_study(cfg, create=not cfg.study.worker)
            if not cfg.study.worker:
                stale = study.fail_stale(optuna_study, experiment_id)
                queued, taken, again = study.enqueue_missing(optuna_study, cfg, experiment_id)
                of_all = len(study.variants(cfg))
                to_run = ([f"{queued} of the {of_all} variants" if 0 < queued < of_all else config.counted(queued, "variant")]
                          if queued or not cfg.study.search_space else [])
                if cfg.study.search_space:
                    to_run.append(config.counted(study.search_trials_left(optuna_study, cfg), "search trial"))
                print(f"study {optuna_study.study_name}: {' and '.join(to_run)} to run"
                      + (f" ({again} ended as diverged by a rule this vaebench no longer applies: a learned scale "
                         "that dipped on dequantized pixels)" if again else "")
                      + (f", {taken} taken from their finished MLflow runs" if taken else "")
                      + (f", {config.counted(stale, 'stale trial')} of dead workers marked failed" if stale else ""))
            # nothing queued, running or left to search: the parent run is not reopened, so keeps its end time
            idle = (not cfg.study.worker and not study.not_ended(optuna_study)
                    and not study.search_trials_left(optuna_study, cfg))
            with stopping.stops_deferred():  # a stop while it is made or reopened is raised once parent_id is set
                parent_id = tracking.parent_run(experiment_id, optuna_study.study_name, cfg, resume=not idle)
        if idle:  # one just made, left RUNNING by a killed command, or FAILED by workers that died after the last trial
            tracking.end_parent(parent_id, "FINISHED", unless_already=True)
            return True
        if cfg.study.n_workers == 1:
            ok = not any(o.state == states.FAILED for o in study.work(cfg, parent_id, experiment_id))
        else:
            ctx = mp.get_context("spawn")
            workers = [ctx.Process(target=_worker, args=(cfg, parent_id, experiment_id, i, os.getpid()))
                       for i in range(cfg.study.n_workers)]
            with stopping.held_in_processes_started():
                for w in workers:
                    w.start()
            _wait_for(workers, cfg, optuna_study, experiment_id)
            ok = all(w.exitcode == 0 for w in workers)
        # trials still running elsewhere, or queued (a joining worker leaves these to the study's own command);
        # first, those of joining workers that died (SIGKILL, a lost machine): not left for the user to wait on.
        # (Inside the try: a stop here ends the parent run KILLED too, not left RUNNING.)
        stale = 0
        if not cfg.study.worker:
            with study.study_lock(cfg):
                stale = study.fail_stale(optuna_study, experiment_id)
        if stale:
            print(f"error: {stale} trials of joining workers that died are marked killed; {RESUME_HINT}", file=sys.stderr)
            ok = False
        cut = [] if cfg.study.worker or not ok else study.cut_short(optuna_study, cfg)
        if cut:  # a joining worker's, stopped or failed while this command ran
            print(f"error: {len(cut)} trials were cut short in other processes ({'; '.join(cut)}); {RESUME_HINT}",
                  file=sys.stderr)
            ok = False
        pending = [] if cfg.study.worker else study.not_ended(optuna_study)
        codes = sorted({w.exitcode for w in workers if w.exitcode})
        if pending and codes and study.only_queued(pending):  # e.g. a script without a __main__ guard
            print(f"error: {len(pending)} trials of this study were not started: this command's workers ended (exit "
                  f"code {', '.join(map(str, codes))}; their errors are above) before taking them. Re-run it once the "
                  "cause is fixed", file=sys.stderr)
        elif pending:
            print(f"error: {len(pending)} trials of this study have not ended: {'; '.join(map(study.where_now, pending))}. This command "
                  "did not wait for them; re-run it once they have", file=sys.stderr)
        tracking.end_parent(parent_id, "FINISHED" if ok and not pending else "FAILED")
        return ok and not pending
    except KeyboardInterrupt as stop:
        # a second Ctrl-C or SIGTERM must not skip the clean-up
        previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            for w in workers:  # each ends its trial as interrupted, then exits
                if w.is_alive():
                    os.kill(w.pid, stopping.signum(stop))
            for w in workers:
                if w.pid is not None:  # not one the stop came before it started
                    w.join()
            if parent_id is not None:  # none yet: a stop before the study's parent run was made or found
                tracking.end_parent(parent_id, "FINISHED" if idle else "KILLED", unless_already=idle)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        raise


def _worker(cfg: Config, parent_id: str, experiment_id: str, position: int, main_pid: int) -> None:
    # Out of the terminal's process group: a Ctrl-C reaches the main process only, which passes it on
    # once (a second SIGINT would interrupt a worker while it records the first).
    os.setpgrp()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # the command started as a shell script's `cmd &`
        # A Ctrl-C at the terminal while this process started (in its process group, the stops held) was
        # not for it: Linux keeps a held signal pending though ignored; let through now, it is dropped.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    # Only the main process sends it SIGINT (a Ctrl-C passed on), which must raise here even where the
    # command started with SIGINT ignored, as spawned workers inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _interrupt_when_orphaned(main_pid)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.study.n_workers))
    try:
        with stopping.stops_raise():
            stopping.let_stops_through()  # one that came while this process started is raised here
            outcomes = study.work(cfg, parent_id, experiment_id, position)
    except KeyboardInterrupt as stop:  # its trial is recorded as interrupted; no traceback
        sys.exit(stopping.exit_code(stop))
    except (MlflowException, *study.STORAGE_ERRORS, OSError) as e:
        print(f"error: worker {position}: {_lost_store(e)}", file=sys.stderr)
        _end_runs_left_open()
        sys.exit(1)
    sys.exit(1 if any(o.state == states.FAILED for o in outcomes) else 0)


def _interrupt_when_orphaned(main_pid: int) -> None:
    """Linux: the worker gets SIGHUP when the main process dies (SIGKILL, a lost terminal), and ends its
    trial as interrupted, saying so, instead of training on, orphaned, out of reach of the terminal's
    Ctrl-C. Elsewhere it trains on, and the next command finds its trial."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    stopping.hang_up_as_orphaned()
    prctl(1, signal.SIGHUP)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != main_pid:  # the main process died before the line above
        os.kill(os.getpid(), signal.SIGHUP)


def _wait_for(workers: list[mp.Process], cfg: Config, optuna_study, experiment_id: str) -> None:
    """Waits for the workers; as each ends, one killed is named, and its trial marked, at once."""
    running = {w.sentinel: (i, w) for i, w in enumerate(workers)}
    while running:
        stopping.raise_if_stopped()  # one this process dropped (see bench.stopping)
        for sentinel in mp_connection.wait(list(running), timeout=1):
            i, w = running.pop(sentinel)
            w.join()
            if w.exitcode < 0:
                print(f"error: worker {i} (pid {w.pid}) was killed by {signal.Signals(-w.exitcode).name}",
                      file=sys.stderr)
            if w.exitcode != 0:  # killed, or stopped by a lost store: its trial may be left running
                with study.study_lock(cfg):
                    stale = study.fail_stale(optuna_study, experiment_id)
                if stale:  # trained again by the next command
                    print(f"its trial is marked killed; {RESUME_HINT}", file=sys.stderr)


def summary(cfg: Config) -> pd.DataFrame:
    """One row per trial of the study: variant, state, validation ELBO and the scale it is on, samples/s
    (the median epoch's, as in the report), and its MLflow run's id (not printed: too wide). A
    trial whose ELBO is not a likelihood of the data has it under "objective", never beside the likelihoods
    (as in the report). An attempt cut short has the trial that trained its variant again under "trained
    again by"."""
    rows, last_attempt = [], {}
    for t in study.open_study(cfg, create=False).get_trials(deepcopy=False):  # in trial order
        if study.VARIANT not in t.user_attrs:
            continue
        variant = study.variant_label(json.loads(t.user_attrs[study.VARIANT]))
        if not study.is_search(t):  # a search may draw one point twice: two trials, not two attempts
            last_attempt[variant] = t.number
        val, likelihood = t.user_attrs.get("val_elbo"), t.user_attrs.get(study.COMPARABLE, True)
        rows.append({"trial": t.number, "variant": variant,
                     "state": t.user_attrs.get(study.STATUS, t.state.name.lower()),
                     "val ELBO": val if likelihood else math.nan, "on": t.user_attrs.get(study.SCALE) or "",
                     "objective": math.nan if likelihood else val,
                     "samples/s (median epoch)": t.user_attrs.get("samples_per_s"),
                     "reason": t.user_attrs.get(study.REASON, ""),
                     "run id": t.user_attrs.get(study.RUN_ID, "")})
    for row in rows:  # an attempt cut short and trained again counts once, as in the report
        again = last_attempt.get(row["variant"], row["trial"])
        row["trained again by"] = again if again != row["trial"] else None
    table = pd.DataFrame(rows).astype({"trained again by": "Int64"}) if rows else pd.DataFrame()
    for empty, columns in (("objective", ["objective"]), ("val ELBO", ["val ELBO", "on"])):  # none has one
        if len(table) and table[empty].isna().all():
            table = table.drop(columns=columns)
    return table


def _printed(table: pd.DataFrame) -> pd.DataFrame:
    """The summary as the console shows it: no run ids and reasons cut at a word (too wide), and an attempt
    cut short as, e.g., "interrupted → 7", the trial that trained its variant again."""
    again = table["trained again by"]
    state = table.state.where(again.isna(), table.state + " → " + again.astype(str))
    reason = table.reason.map(lambda text: textwrap.shorten(text, 60, placeholder=" …"))
    return table.assign(state=state, reason=reason).drop(columns=["run id", "trained again by"])


def _report(argv: list[str]) -> bool:
    """Writes the study's report as `python -m bench.report` with the same arguments does; False, with the
    reason on stderr, when it could not: the study's runs stand either way."""
    try:
        written = report.main(argv) == 0  # it names what failed (a full disk, a store it cannot read)
    except Exception as e:  # noqa: BLE001  a report bug must not hide that every trial has ended
        print(f"error: the report failed ({type(e).__name__}: {config.first_line(e)})", file=sys.stderr)
        written = False
    if not written:
        print("the study's runs are kept; once the cause above is fixed, `python -m bench.report` with the same "
              "arguments writes its report", file=sys.stderr)
    return written


class StudyNotEnded(RuntimeError):
    """From run_study: a trial failed for a reason other than divergence, a worker died, trials have not
    ended, or the report could not be written (the errors printed above say which: the command would exit
    1). `table` is the study's summary. Re-running resumes: finished trials are kept."""

    def __init__(self, table: pd.DataFrame):
        super().__init__("not every trial of the study ended, or its report was not written: see the errors "
                         f"printed above; re-running the same study resumes it ({len(table)} trials so far)")
        self.table = table


def run_study(overrides: Sequence[str]) -> pd.DataFrame:
    """The main job from Python: what `python -m bench.run` does with these arguments (the same output and
    report), returning the summary table (one row per trial) where the command exits 0. Raises instead of
    exiting: ConfigError for bad input (nothing written), KeyboardInterrupt once the trial in progress is
    recorded as interrupted, MlflowException, OSError or an Optuna storage error for a lost store, and
    StudyNotEnded where the command exits 1."""
    args = _arguments(overrides)
    table, ok = execute(checked(args), args)
    if not ok:
        raise StudyNotEnded(table)
    return table


def _arguments(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str):  # it would read as one argument per character
        raise TypeError(f"the arguments are a list of strings, e.g. {argv.split()!r}, not one string")
    return list(argv)


def _ending() -> None:
    """The command (not `main` called from Python, which returns) ends on this stop: further ones are ignored."""
    if __name__ == "__main__":
        stopping.ignore_further_stops()


def _lost_store(error: Exception) -> str:
    """What a lost tracking store or Optuna storage, or a file that could not be written (a full disk under
    the artifacts), means for the user (the storage's error is Optuna's wrapper: the database's own is its
    cause)."""
    if isinstance(error, MlflowException):
        return f"MLflow tracking failed ({config.first_line(error)}); {RESUME_HINT}"
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {config.redact(str(error))}; {RESUME_HINT}"
    return f"{LOST_STORAGE} ({config.first_line(error.__cause__ or error)}); {RESUME_HINT}"


def _end_runs_left_open() -> None:
    """After an error, the runs this process left open are ended FAILED: not FINISHED by MLflow's exit
    handler (such a run has no state tag, and the next command trains its variant again), nor left on
    MLflow's stack of active runs, where the next study in the same process (a notebook) would trip on
    them. Each is taken off the stack even where the store is lost."""
    while mlflow.active_run() is not None:
        with contextlib.suppress(MlflowException, OSError):
            mlflow.end_run("FAILED")


if __name__ == "__main__":
    bench.command_starts()
    # In a log file (nohup, a scheduler's job log) the study's header and its "N variants to run" come as
    # they are printed, before the trials' progress lines (stderr), not when the command ends, or never
    # (a killed job); MLflow's two "View run" lines per run on a tracking server give way to the summary's
    # one link to the experiment.
    sys.stdout.reconfigure(line_buffering=True)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    sys.exit(main())
