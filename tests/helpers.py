"""Helpers of the fault and scale-out tests: one torch thread; servers on 127.0.0.1 only, a throwaway
PostgreSQL cluster and an MLflow tracking server. PostgreSQL comes from Debian's `postgresql` package
(tests/setup.sh installs it); a missing one fails the test with that hint rather than skipping it."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import shrink_args

# The processes these tests start train on one thread too (see tests/conftest.py).
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# Three variants (seeds) on all of digits, trials of ~4 s here (60 epochs of 75 steps): long enough to be
# caught running. The catch comes ~0.6 s after a worker claims its trial (its MLflow run is made first);
# trials of ~1 s (30 epochs of batch 64, once the step got fast) ended before it in a CI run.
SEEDS = [0, 1, 2]
SEED_STUDY = """study:
  grids:
    - likelihood.name: [bernoulli]
data: {binarize: static}
model: {hidden: [64], latent_dim: 8}
train: {batch_size: 16}
"""


def seed_study_args(tmp_path: Path) -> list[str]:
    (tmp_path / "seeds.yaml").write_text(SEED_STUDY)
    return [f"study={tmp_path / 'seeds.yaml'}", *shrink_args(tmp_path), "data.limit=0", "train.epochs=60",
            "eval.figures=false", f"study.seeds={SEEDS}"]


def _trials_now(tmp_path: Path, *attrs: str) -> list[tuple]:
    """(number, state, has an MLflow run, *the JSON of each of `attrs` or None) per trial, read from the
    Optuna SQLite file of the running study without the Optuna API (which would create the file or its
    tables)."""
    db = tmp_path / "optuna.db"
    if not db.exists():
        return []
    values = "".join(f", (SELECT value_json FROM trial_user_attributes a WHERE a.trial_id = t.trial_id"
                     f" AND a.key = '{attr}')" for attr in attrs)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        try:
            return conn.execute("SELECT number, state, EXISTS(SELECT 1 FROM trial_user_attributes a WHERE"
                                f" a.trial_id = t.trial_id AND a.key = 'mlflow_run_id'){values} FROM trials t"
                                " ORDER BY number").fetchall()
        except sqlite3.OperationalError:  # tables not made yet
            return []


@contextlib.contextmanager
def _sigint_handled(handler=signal.default_int_handler) -> Iterator[None]:
    """Children started inside get SIGINT as a terminal gives it (Python's KeyboardInterrupt), also where
    the tests run as a background job, which ignores SIGINT: an ignored signal stays ignored across exec,
    a handled one is reset to its default. With `handler=signal.SIG_IGN`, they start as a shell script's
    `cmd &` does, SIGINT ignored. (Not preexec_fn: it is unsafe in a process with threads.)"""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def a_worker_of(pid: int, timeout_s: float = 120) -> int:
    """The pid of the first worker that the study's command `pid` spawns, once there is one."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(psutil.NoSuchProcess):
            workers = [p.pid for p in psutil.Process(pid).children() if "spawn_main" in " ".join(p.cmdline())]
            if workers:
                return workers[0]
        assert time.monotonic() < deadline, f"no worker of process {pid} after {timeout_s} s"
        time.sleep(0.01)


def wait_until_it_imports_torch(pid: int, timeout_s: float = 120) -> None:
    """Returns once process `pid` has loaded torch's library, in the middle of its imports (torch's and
    MLflow's take seconds more): a signal sent now interrupts an import. Reads /proc (Linux)."""
    deadline = time.monotonic() + timeout_s
    while "libtorch" not in Path(f"/proc/{pid}/maps").read_text():
        assert time.monotonic() < deadline, f"process {pid} had not loaded torch after {timeout_s} s"
        time.sleep(0.005)


@contextlib.contextmanager
def another_live_process() -> Iterator[int]:
    """The pid of a live process of this machine other than this one (a worker of another command, say),
    gone once the block ends."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def start_and_catch_a_worker(args: list[str], tmp_path: Path, sigint=signal.default_int_handler
                             ) -> tuple[subprocess.Popen, int, int]:
    """Starts `python -m bench.run` with `args` (study.n_workers > 1; output in <tmp>/run.log; SIGINT as
    `sigint`, see _sigint_handled) and returns once a worker trains a trial with its MLflow run: the
    process, the trial's number and its worker's pid."""
    with open(tmp_path / "run.log", "w") as log, _sigint_handled(sigint):
        proc = subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, env=ONE_THREAD_ENV)
    deadline = time.monotonic() + 400
    while True:
        running = [(number, owner) for number, state, has_run, owner in _trials_now(tmp_path, "owner")
                   if state == "RUNNING" and has_run and owner]
        if running:
            number, owner = running[0]
            return proc, number, int(owner.strip('"').rpartition(":")[2])
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()
        time.sleep(0.1)


def start_and_catch_second_trial(args: list[str], tmp_path: Path, env: dict[str, str] = ONE_THREAD_ENV,
                                 sigint=signal.default_int_handler) -> subprocess.Popen:
    """Starts `python -m bench.run` (output in <tmp>/run.log; SIGINT as `sigint`, see _sigint_handled) and
    returns once trial 0 is complete and trial 1 is running with its MLflow run."""
    with open(tmp_path / "run.log", "w") as log, _sigint_handled(sigint):
        proc = subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 400
    while True:
        trials = _trials_now(tmp_path)
        if len(trials) == 3 and trials[0][1] == "COMPLETE" and trials[1][1:] == ("RUNNING", 1):
            return proc
        log = (tmp_path / "run.log").read_text
        assert proc.poll() is None and time.monotonic() < deadline, (trials, log())
        time.sleep(0.1)


SETUP_HINT = "run `bash tests/setup.sh`, which installs PostgreSQL and the project's dev extra"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """initdb into a temporary folder, then `pg_ctl start` on a free port of 127.0.0.1, trust auth (the
    cluster lives for one test session and listens on the loopback only). As root, the server runs as
    the `postgres` OS user: PostgreSQL refuses to run as root."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.fail(f"PostgreSQL not found (/usr/lib/postgresql/*/bin/pg_ctl); {SETUP_HINT}")
        try:
            import psycopg
        except ImportError:
            pytest.fail(f"the psycopg driver is missing; {SETUP_HINT}")
        self.psycopg, self.bin = psycopg, Path(found[-1]).parent
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="vaebench-pg-"))
        self.user = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.getuid() == 0 else {}
        if self.user:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        out = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True,
                             timeout=120, check=False, **self.user)
        if out.returncode != 0:
            pytest.fail(f"{' '.join(args[:2])} failed: {out.stdout}{out.stderr}; {SETUP_HINT}")

    def start(self) -> None:
        data = str(self.root / "data")
        self._run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")
        # fsync off: a test cluster need not survive a power cut
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", data, "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def database(self, name: str) -> str:
        """A fresh, empty database; returns its URL."""
        with self.psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                                  autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, log: Path, port: int = 0) -> Iterator[str]:
    """`mlflow server --host 127.0.0.1` on a free port, serving artifacts from `artifacts`; yields its URL
    once /health answers, and stops it (with its workers) at the end."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1", "--backend-store-uri", backend,
                                 "--serve-artifacts", "--artifacts-destination", str(artifacts)],
                                stdout=out, stderr=subprocess.STDOUT, env=ONE_THREAD_ENV,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a fresh database first gets MLflow's migrations
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
