"""The benchmark command (README, Benchmarks): it writes its JSON and Markdown only when every selected
benchmark passed, so that a failed run leaves the committed results as they were; and its verdicts on
the targets, by a confidence interval for the median over the rounds."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("where", ["README.md/out.json", "reports"])  # under a file; a folder
def test_a_json_path_that_cannot_be_written_is_refused_before_anything_runs(where, tmp_path):
    clone = _clone_without_data(tmp_path)
    (clone / "README.md").write_text("a file\n")
    before = sorted(p for p in clone.rglob("*") if "__pycache__" not in p.parts)
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/benchmarks", "--benchmark-only", "-k", FLOOR,
                           f"--benchmark-json={where}"], cwd=clone, capture_output=True, text=True, check=False)
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]  # pytest's usage error
    assert f"--benchmark-json={where}: " in proc.stderr and "Traceback" not in proc.stderr
    assert "passed" not in proc.stdout
    assert sorted(p for p in clone.rglob("*") if "__pycache__" not in p.parts and ".pytest_cache" not in p.parts) == before


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


def test_the_stacked_target_is_decided_by_the_interval_of_its_per_round_step_rate():
    from tests.benchmarks.conftest import markdown, summarize

    def bench(kind, ms_per_step, variants=1, **paired_ms):
        info = {"kind": kind, "device": "cuda", "family": "bernoulli", "n_samples": 1, "n_params": 1,
                "batch": 128, "steps": 20, "variants": variants,
                "paired": {name: {"rounds": ms, "median": sorted(ms)[6], "best": min(ms)}
                           for name, ms in paired_ms.items()}}
        rounds = [20e-3 * ms for ms in ms_per_step]  # seconds a round of 20 steps
        return {"name": kind, "extra_info": info,
                "stats": {"median": sorted(rounds)[6], "min": min(rounds), "rounds": len(rounds), "data": rounds}}

    single = [1.0] * 12
    ours = bench("ours", single, floor=[0.5] * 12)

    def stacked(rates):  # step rates vs the single variant's, round by round
        return summarize([ours, bench("stacked", [1 / r for r in rates], 16, single=single)], "cmd")

    spread = stacked([0.40, 0.44, 0.45, 0.47, 0.48, 0.49, 0.50, 0.51, 0.52, 0.53, 0.55, 0.60])
    d = spread["ratios"]["cuda"]
    assert d["stacked_16_step_rate_vs_single_interval"][:2] == pytest.approx([0.45, 0.53])
    assert d["target_stacked"].startswith("not resolved")  # median 0.495, but the interval spans 0.5
    assert "(96 % interval of the median 0.45 to 0.53; target ≥ 0.5: not resolved" in markdown(spread)
    # its row: the median round's 1/0.49 ms for 16 × 128 images; 16 variants at 0.49 of one's step rate
    assert "| 16 | 2.04 (1.67) | 1,003,520 (1,228,800) | 1.00 (1.00) | 0.49 | 7.92× |" in markdown(spread)
    assert stacked([0.51 + 0.01 * i for i in range(12)])["ratios"]["cuda"]["target_stacked"] == "met"
    assert stacked([0.30 + 0.01 * i for i in range(12)])["ratios"]["cuda"]["target_stacked"] == "not met"



def test_the_breakdown_inside_the_step_is_of_the_same_rounds_as_the_parts_alone():
    from tests.benchmarks.conftest import markdown, summarize

    def paired(ms):
        return {"rounds": list(ms), "median": sorted(ms)[6], "best": min(ms)}

    rounds = [20e-3 * 4.0] * 12  # ours: 4 ms a step
    info = {"kind": "ours", "device": "cpu", "family": "bernoulli", "n_samples": 1, "n_params": 1, "batch": 128,
            "steps": 20, "variants": 1,
            "paired": {"floor": paired([2.0] * 12), "adam": paired([0.2] * 12), "likelihood": paired([0.3] * 12),
                       "in_step": paired([4.4] * 12)},
            "in_step_parts": {"mlp": [2.2] * 12, "likelihood": [0.6] * 12, "adam": [0.5] * 12}}
    summary = summarize([{"name": "ours", "extra_info": info,
                          "stats": {"median": rounds[6], "min": min(rounds), "rounds": 12, "data": rounds}}], "cmd")
    q = summary["ratios"]["cpu"]["in_step_ms"]
    assert q["rest"] == pytest.approx(4.4 - 2.2 - 0.6 - 0.5)
    assert (q["mlp_over_floor"], q["likelihood_over_alone"], q["adam_over_alone"]) == pytest.approx((1.1, 2.0, 2.5))
    text = markdown(summary)
    assert "the 11 matrix products (the floor) 2.00 ms, Adam's update of all parameters 0.20 ms" in text
    assert ("- the same, timed inside the step (a copy of our round, 4.40 ms/step, its parts timed where they run; "
            "medians of the same rounds): the two MLPs' passes (the 11 products with their ReLUs and bias sums) "
            "2.20 ms (1.10× the floor), log p(x|z) and its gradient 0.60 ms (2.00× its time alone), Adam 0.50 ms "
            "(2.50× alone), and 1.10 ms for the rest (the reparameterisation, KL, data transform, and the Python "
            "between these parts)") in text
    del info["in_step_parts"]  # a run from before in_step (the Xeon's JSON): the breakdown alone
    assert "timed inside the step" not in markdown(summarize([{"name": "ours", "extra_info": info, "stats": {
        "median": rounds[6], "min": min(rounds), "rounds": 12, "data": rounds}}], "cmd"))


def test_our_log_sigmoid_is_timed_against_torchs_in_the_same_rounds():
    """The reason models.likelihoods.log_sigmoid exists is a speed that depends on the CPU: the benchmark
    times both on the headline test's rounds, and the ratio is taken round by round."""
    from tests.benchmarks.conftest import markdown, summarize

    ours_ms = [0.2] * 12
    torch_ms = [0.2 * r for r in (0.7, 0.75, 0.8, 0.82, 0.84, 0.85, 0.85, 0.88, 0.9, 0.95, 1.0, 1.1)]
    summary = summarize([_ours("bernoulli", 1, [2.5] * 12, floor=[1.3] * 12, log_sigmoid=ours_ms,
                               torch_log_sigmoid=torch_ms)], "cmd")
    d = summary["ratios"]["cpu"]
    assert d["torch_log_sigmoid_over_ours_median"] == pytest.approx(0.85)
    assert d["torch_log_sigmoid_over_ours_interval"][:2] == pytest.approx([0.8, 0.95])  # 3rd of 12 from each end
    assert ("our formula (`models.likelihoods.log_sigmoid`) 0.200 ms, torch's `F.logsigmoid` 0.170 ms: torch's "
            "takes **0.85×** our time (96 % interval of the median 0.80 to 0.95)") in markdown(summary)
    before_this_line = _ours("bernoulli", 1, [2.5] * 12, floor=[1.3] * 12, log_sigmoid=ours_ms)
    assert "F.logsigmoid" not in markdown(summarize([before_this_line], "cmd"))


def test_the_log_sigmoid_rounds_run_our_formula_and_torchs_on_the_decoders_logits(monkeypatch):
    import torch
    import torch.nn.functional as F

    from bench import data as data_mod
    from models import likelihoods
    from tests.benchmarks import test_speed as speed

    cfg = speed._config("bernoulli", 1, "cpu")
    calls = []

    def recorder(name, fn):
        def record(x):
            calls.append((name, tuple(x.shape), torch.is_grad_enabled()))
            return fn(x)
        return record

    monkeypatch.setattr(likelihoods, "log_sigmoid", recorder("ours", likelihoods.log_sigmoid))
    monkeypatch.setattr(F, "logsigmoid", recorder("torch", F.logsigmoid))
    rounds = speed.parts_rounds(cfg, data_mod.load(cfg.data, "cpu"))
    rounds["log_sigmoid"]()
    rounds["torch_log_sigmoid"]()
    assert calls == [("ours", (128, 784), False)] * speed.STEPS + [("torch", (128, 784), False)] * speed.STEPS


def test_the_in_step_round_times_its_parts_inside_our_round_and_unwraps_them():
    from bench import data as data_mod
    from tests.benchmarks import test_speed as speed

    cfg = speed._config("bernoulli", 1, "cpu")
    originals = {(owner, name): getattr(owner, name) for owner, names in speed.IN_STEP_PARTS.values() for name in names}
    timed_round = speed.in_step_round(cfg, data_mod.load(cfg.data, "cpu"))
    start = time.perf_counter()
    timed_round()
    round_ms = 1e3 * (time.perf_counter() - start) / speed.STEPS
    assert all(getattr(owner, name) is fn for (owner, name), fn in originals.items())
    parts = timed_round.parts
    assert set(parts) == {"mlp", "likelihood", "adam"} and all(len(ms) == 1 and ms[0] > 0 for ms in parts.values())
    assert sum(ms[0] for ms in parts.values()) < round_ms


def test_the_core_to_core_probe_is_summarised_from_its_rounds_and_only_when_it_ran():
    from tests.benchmarks.conftest import markdown, summarize

    def summary(**extra):
        rounds = [20e-3 * 4.0] * 12
        info = {"kind": "ours", "device": "cpu", "family": "bernoulli", "n_samples": 1, "n_params": 1, "batch": 128,
                "steps": 20, "variants": 1, "paired": {"floor": {"rounds": [2.0] * 12, "median": 2.0, "best": 2.0}}}
        info.update(extra)
        return summarize([{"name": "ours", "extra_info": info,
                           "stats": {"median": rounds[6], "min": min(rounds), "rounds": 12, "data": rounds}}], "cmd")

    probe = [0.2] * 5 + [2.1] * 7
    probed = summary(core_to_core_ns_per_line=probe)
    assert probed["ratios"]["cpu"]["core_to_core_ns_per_line"] == {"median": 2.1, "range": [0.2, 2.1], "rounds": probe}
    assert ("a line one thread wrote, another thread's core read, and the first writes again costs **2.1 ns** "
            "more than one that stays with its core (median of the same rounds; 0.2 to 2.1)\n") in markdown(probed)
    with_in_step = summary(core_to_core_ns_per_line=probe, paired={
        name: {"rounds": [ms] * 12, "median": ms, "best": ms}
        for name, ms in (("floor", 2.0), ("adam", 0.2), ("likelihood", 0.3), ("in_step", 4.4))}, in_step_parts={
        "mlp": [2.2] * 12, "likelihood": [0.6] * 12, "adam": [0.3] * 5 + [1.4] * 7})
    assert ("round by round, beside Adam inside the step (ns per line / ms): " + ", ".join(
        ["0.2 / 0.30"] * 5 + ["2.1 / 1.40"] * 7)) in markdown(with_in_step)
    plain = summary()  # a run from before the probe, or with one thread
    assert "core_to_core_ns_per_line" not in plain["ratios"]["cpu"] and "between cores" not in markdown(plain)


def test_paired_rounds_run_their_probes_untimed_after_the_references():
    from tests.benchmarks import test_speed as speed

    calls = []
    paired = speed.Paired(0, probes=[lambda: calls.append("probe")], floor=lambda: calls.append("floor"))
    paired()
    paired()
    assert calls == ["floor", "probe"] * 2 and set(paired.info()) == {"floor"}


def test_the_core_to_core_round_keeps_one_figure_per_round():
    from tests.benchmarks import test_speed as speed

    probe = speed.core_to_core_round(n=1 << 16, repeats=2)
    probe()
    probe()
    assert len(probe.ns_per_line) == 2 and all(math.isfinite(x) for x in probe.ns_per_line)


def test_a_setting_row_states_which_step_is_faster_with_its_interval():
    """A setting away from the default (say train.compile=true) is paired with the default step: the line
    names the faster of the two, with the interval of the median per-round ratio in that direction."""
    from tests.benchmarks.conftest import markdown, summarize

    def setting(name, ratios, default=(1.0,) * 12):  # the setting's round over the default's, round by round
        info = {"kind": "ours_setting", "device": "cpu", "family": "bernoulli", "n_samples": 1, "n_params": 1,
                "batch": 128, "steps": 20, "variants": 1, "setting": name,
                "paired": {"default": {"rounds": list(default), "median": sorted(default)[6], "best": min(default)}}}
        rounds = [20e-3 * r * d for r, d in zip(ratios, default, strict=True)]
        return {"name": name, "extra_info": info,
                "stats": {"median": sorted(rounds)[6], "min": min(rounds), "rounds": 12, "data": rounds}}

    text = markdown(summarize([setting("train.backward=autograd", [1.1 + 0.01 * i for i in range(12)]),
                               setting("train.compile=true", [0.8 + 0.01 * i for i in range(12)]),
                               # faster in 11 of 12 rounds, but the default's one lucky round is the fastest of all
                               setting("train.other=1", [0.9] * 11 + [1.8], default=(1.0,) * 11 + (0.5,))], "cmd"))
    assert ("- the default instead of `train.backward=autograd` (bernoulli, L = 1): **1.16 (1.10)× faster** "
            "(96 % interval of the median 1.12 to 1.19)") in text
    assert ("- `train.compile=true` instead of the default (bernoulli, L = 1): **1.17 (1.25)× faster** "
            "(96 % interval of the median 1.12 to 1.22)") in text
    assert ("- `train.other=1` instead of the default (bernoulli, L = 1): **1.11× faster** (96 % interval of the "
            "median 1.11 to 1.11; but fastest round against fastest round 1.80× slower)") in text

def test_logging_decides_the_overhead_only_where_the_wall_clock_cannot():
    from tests.benchmarks.conftest import tracking_verdict

    def overhead(low, high, largest_own):
        own = None if largest_own is None else {"median": largest_own / 2, "largest": largest_own,
                                                   "median_at_mlflow_rate": largest_own / 4, "mlflow_sampling_s": 10}
        return {"overhead_interval": [low, high, 0.96], "overhead_median": (low + high) / 2,
                "overhead_best": low, "logging_time": own}

    assert tracking_verdict(overhead(-0.01, 0.02, 0.05)) == "met"  # the wall clock decides where it can
    assert tracking_verdict(overhead(0.04, 0.08, 0.001)) == "not met"
    assert tracking_verdict(overhead(-0.2, 0.3, 0.028)) == (
        "met by the logging's own time 1.40 % (at most 2.80 % in a round; 0.70 % at MLflow's 10 s); "
        "the wall clock's interval spans the target on this machine")
    assert tracking_verdict(overhead(-0.2, 0.3, 0.031)).startswith("not resolved: the logging's own time 1.55 %")
    assert tracking_verdict(overhead(-0.2, 0.3, None)).startswith("not resolved on this machine")


def test_logged_samples_per_s_are_compared_round_by_round_with_an_interval():
    """As every ratio of the suite: each logged run over the benchmark round right before it; results from
    before this (no per-round ratios) keep the ratio of the two medians alone."""
    import copy
    import json

    from tests.benchmarks.conftest import markdown, summarize

    committed = json.loads((REPO / "reports" / "benchmarks" / "cpu-amd-epyc.json").read_text())["benchmarks"]
    runs = copy.deepcopy(committed)
    samples = next(b["extra_info"]["tracking_overhead"]["samples_per_s"] for b in runs
                   if "tracking_overhead" in b.get("extra_info", {}))
    samples["logged_over_benchmark_per_round"] = [0.95 + 0.01 * i for i in range(12)][::-1]  # 1.06 … 0.95
    samples["logged_over_benchmark_paired_median"] = 1.005
    text = markdown(summarize(runs, "cmd"))
    assert ("as the suite's other ratios): logged / benchmark **1.005** (96 % interval of the median 0.970 to "
            "1.040); per round: 1.060, 1.050,") in text
    del samples["logged_over_benchmark_per_round"], samples["logged_over_benchmark_paired_median"]
    assert "Round by round" not in markdown(summarize(runs, "cmd"))


def test_the_logging_share_is_of_the_epoch_without_it_and_scales_only_the_sampler_to_mlflows_rate():
    from tests.benchmarks.test_tracking_overhead import (
        MLFLOW_SYSTEM_METRICS_S,
        SYSTEM_METRICS_S,
        logging_shares,
    )

    on = [{"main": 4.0, "threads": 46.0, "sampler": 20.0}, {"main": 2.0, "threads": 18.0, "sampler": 10.0}]
    shares = logging_shares(on, [{"main": 0.0, "threads": 0.1, "sampler": 0.0}] * 2, [2050.0, 1020.0])
    assert shares["per_round"] == pytest.approx([50 / 2000, 20 / 1000])
    kept = 1 - SYSTEM_METRICS_S / MLFLOW_SYSTEM_METRICS_S  # of the sampler's CPU, removed at MLflow's rate
    assert shares["per_round_at_mlflow_rate"] == pytest.approx([(50 - kept * 20) / 2000, (20 - kept * 10) / 1000])
    assert (shares["largest"], shares["median"]) == pytest.approx((0.025, 0.0225))
    assert shares["off_threads_ms_per_epoch"] == 0.1


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads' CPU time is read from Linux's /proc")
def test_the_logging_time_counts_other_threads_cpu_and_not_the_main_threads():
    # in a fresh process: a thread left by an earlier test (a writer, a sampler) would add its CPU time
    out = subprocess.run([sys.executable, "-c", f"from {__name__} import check_logging_time; check_logging_time()"],
                         check=False, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr


def check_logging_time() -> None:
    from tests.benchmarks.test_tracking_overhead import SAMPLER_THREAD, _Clock

    def burn(seconds):  # CPU time of the calling thread
        start = time.thread_time()
        while time.thread_time() - start < seconds:
            pass

    clock = _Clock()
    clock(0, {})  # the first epoch ends: counting starts
    burn(0.2)  # the main thread trains: not the logging's
    assert clock.other_threads_s()["threads"] < 0.05
    logger = threading.Thread(target=burn, args=(0.2,))
    logger.start()
    logger.join()  # a thread that logs, ended before the count: its CPU still counts
    sampler = threading.Thread(target=burn, args=(0.1,), name=SAMPLER_THREAD)
    sampler.start()
    sampler.join()  # ended: its CPU counts among the threads', but no longer as the sampler's
    others = clock.other_threads_s()
    assert 0.3 <= others["threads"] < 0.4 and others["sampler"] == 0
    waiting = threading.Event()
    sampler = threading.Thread(target=lambda: (burn(0.1), waiting.wait()), name=SAMPLER_THREAD)
    sampler.start()
    deadline = time.monotonic() + 30
    while clock.other_threads_s()["sampler"] < 0.1:
        assert time.monotonic() < deadline, "the live sampler thread's CPU was never counted"
        time.sleep(0.01)
    others = clock.other_threads_s()
    assert 0.1 <= others["sampler"] < 0.15 and 0.4 <= others["threads"] < 0.5
    clock(1, {})
    own = clock.logging_ms()
    waiting.set()
    sampler.join()
    assert own["threads"] == pytest.approx(1e3 * others["threads"], abs=50)
    assert own["sampler"] == pytest.approx(1e3 * others["sampler"], abs=50)


def _ours(family, n_samples, ms, **paired_ms):
    """A row of test_step: `ms` our ms/step round by round, `paired_ms` its references' rounds."""
    info = {"kind": "ours", "device": "cpu", "family": family, "n_samples": n_samples, "n_params": 1,
            "batch": 128, "steps": 20, "variants": 1,
            "paired": {name: {"rounds": list(r), "median": sorted(r)[6], "best": min(r)} for name, r in paired_ms.items()}}
    rounds = [20e-3 * x for x in ms]
    return {"name": f"{family}-{n_samples}", "extra_info": info,
            "stats": {"median": sorted(rounds)[6], "min": min(rounds), "rounds": 12, "data": rounds}}


def test_each_family_is_priced_against_the_bernoullis_step_of_the_same_rounds():
    """Family rows are timed minutes apart, so their ms/step do not compare on a drifting machine: each family's
    step over the Bernoulli's step paired with it, round by round, does."""
    from tests.benchmarks.conftest import markdown, summarize

    drift = [1.0 + 0.1 * i for i in range(12)]  # the machine slows down over the rounds
    rows = [_ours("bernoulli", 1, [2.0] * 12, floor=[1.0] * 12),
            _ours("gaussian_learned", 1, [3.0 * d for d in drift], floor=[2.0] * 12, bernoulli=[2.0 * d for d in drift])]
    summary = summarize(rows, "cmd")
    learned = summary["rows"][1]
    assert learned["x_bernoulli"] == pytest.approx(1.5) and learned["x_bernoulli_interval"][:2] == pytest.approx([1.5, 1.5])
    assert "x_bernoulli" not in summary["rows"][0]
    text = markdown(summary)
    assert "| family | L=1 samples/s | L=1 ms/step | L=1 × floor | L=1 × bernoulli |" in text
    assert "| 2.00 (2.00) | 2.00 (2.00) | 1 |" in text  # the Bernoulli's own row
    assert "| 1.50 (1.50) |" in text and "× bernoulli: over the Bernoulli's step" in text
    # a JSON from before the pairing renders as it did, without the column
    del rows[1]["extra_info"]["paired"]["bernoulli"]
    old = markdown(summarize(rows, "cmd"))
    assert "× bernoulli" not in old and "| family | L=1 samples/s | L=1 ms/step | L=1 × floor |" in old


def test_a_selection_without_our_rows_writes_no_empty_family_table():
    from tests.benchmarks.conftest import markdown, summarize

    floor = {"name": "floor", "extra_info": {"kind": "floor", "device": "cpu", "n_samples": 1, "n_params": 1,
                                               "batch": 128, "steps": 20, "variants": 1},
             "stats": {"median": 0.02, "min": 0.02, "rounds": 12, "data": [0.02] * 12}}
    text = markdown(summarize([floor], "cmd"))
    assert "| family |" not in text and "per likelihood family" not in text
    assert "| GEMM floor, 1 decoder output(s) per pixel | 1 |" in text


def test_a_run_started_on_a_busy_machine_says_so():
    import os

    from tests.benchmarks.conftest import markdown, summarize

    rows = [_ours("bernoulli", 1, [2.0] * 12, floor=[1.0] * 12)]
    cores = os.cpu_count()
    assert "was busy" not in markdown(summarize(rows, "cmd", load_at_start=0.1))
    busy = markdown(summarize(rows, "cmd", load_at_start=cores + 1.5))
    assert f"load average {cores + 1.5} at the start" in busy
    assert f"**The machine was busy when the run started** (load average {cores + 1.5} on {cores} cores)" in busy


def test_a_familys_benchmark_times_the_bernoullis_step_in_its_rounds(tmp_path):
    import json

    out = tmp_path / "laplace.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/benchmarks", "--benchmark-only", "-k",
                           "test_step and laplace-1-cpu", f"--benchmark-json={out}"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    (row,) = json.loads(out.read_text())["vaebench"]["rows"]
    assert row["family"] == "laplace" and len(row["paired"]["bernoulli"]["rounds"]) == len(row["round_ms"]) == 12
    assert row["x_bernoulli"] > 0 and len(row["x_bernoulli_interval"]) == 3
    assert "L=1 × bernoulli |" in out.with_suffix(".md").read_text()
