"""The benchmark command (README, Benchmarks) writes its JSON and Markdown only when every selected
benchmark passed: a failed run leaves the committed results as they were."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = "test_gemm_floor and 1-1-cpu"  # runs anywhere: no data needed


def _clone_without_data(tmp_path: Path) -> Path:
    """The code of this checkout in a folder with no ../shared/data beside it, and committed results."""
    clone = tmp_path / "clone"
    for folder in ("bench", "models", "tests"):
        shutil.copytree(REPO / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", clone)
    results = clone / "reports" / "benchmarks"
    results.mkdir(parents=True)
    for name in ("cpu.json", "cpu.md"):
        (results / name).write_text("committed\n")
    return clone


def _bench(clone: Path, selection: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "tests/benchmarks", "--benchmark-only", "-k", selection,
                           "--benchmark-json=reports/benchmarks/cpu.json"], cwd=clone, capture_output=True, text=True,
                          check=False)


def test_a_failed_benchmark_run_leaves_the_committed_results(tmp_path):
    clone = _clone_without_data(tmp_path)
    results = clone / "reports" / "benchmarks"

    failed = _bench(clone, f"{FLOOR} or test_step and bernoulli-1-cpu")  # the step needs MNIST: it fails
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "t10k-images-idx3-ubyte.gz is missing" in failed.stdout
    assert "NOT written" in failed.stdout
    assert [(results / n).read_text() for n in ("cpu.json", "cpu.md")] == ["committed\n"] * 2

    passed = _bench(clone, FLOOR)
    assert passed.returncode == 0, passed.stdout[-3000:]
    assert '"vaebench"' in (results / "cpu.json").read_text()
    assert "GEMM floor" in (results / "cpu.md").read_text()
