"""Servers for the scale-out tests, on 127.0.0.1 only: a throwaway PostgreSQL cluster and an MLflow
tracking server. PostgreSQL comes from Debian's `postgresql` package (tests/setup.sh installs it); a
missing one fails the test with that hint rather than skipping it."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

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
        out = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                             **self.user)
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
    """`mlflow server` on 127.0.0.1 (a free port), serving artifacts from `artifacts`; yields its URL
    once /health answers, and stops it (with its workers) at the end."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", "1", "--backend-store-uri", backend, "--serve-artifacts",
                                 "--artifacts-destination", str(artifacts)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
