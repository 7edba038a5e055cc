"""The benchmark command (README, Benchmarks): it writes its JSON and Markdown only when every selected
benchmark passed, so that a failed run leaves the committed results as they were; and its verdicts on
the targets, by a confidence interval for the median over the rounds."""

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


def test_a_target_is_met_only_when_the_medians_interval_is_on_its_side():
    from tests.benchmarks.conftest import median_interval, verdict

    rounds = [0.01 * i for i in range(12)]  # 0.00 … 0.11, given in reverse: the order must not matter
    low, high, coverage = median_interval(rounds[::-1])
    # 12 rounds: the 3rd smallest and 3rd largest; coverage 1 − 2 P(Bin(12, ½) ≤ 2) = 1 − 2·79/4096
    assert (low, high) == (rounds[2], rounds[9])
    assert coverage == 1 - 2 * 79 / 4096
    assert median_interval([1.0] * 5) is None  # 5 rounds reach at most 1 − 2/32 < 95 %

    below = lambda x: x < 0.03
    assert verdict([0.0, 0.02, 0.96], below, 0.01, 0.0) == "met"
    assert verdict([0.04, 0.05, 0.96], below, 0.045, 0.04) == "not met"
    assert verdict([-0.28, 0.31, 0.96], below, -0.04, -0.06).startswith("not resolved")
    assert verdict(None, below, 0.01, 0.04) == "met on the median only"  # no rounds: median and best
