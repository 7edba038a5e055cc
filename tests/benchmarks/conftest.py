"""The benchmarks' summary: per-row samples/s and ms/step, ours vs the classic loop, ours vs the GEMM
floor, the stacked variants' step rate. Added to the JSON under "vaebench", rendered as
a Markdown section beside the JSON (cpu.json -> cpu.md), and printed at the end of the run.

Every figure is a benchmark's round time in that JSON divided by its steps per round: the median round
(the headline) and the fastest round ("best"; other processes on a shared machine can only slow a round
down). Each ratio divides two timings taken in the same test, round by round ("paired" in the JSON's
extra_info; see test_speed.py), never two benchmarks that ran minutes apart.

test_tracking_overhead.py adds a block per device to "tracking_overhead": an epoch's time with MLflow logging on
and off (paired rounds; target < 3 %), and the samples/s the runner logs against the benchmark's own.
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.train import flush_subnormals

TARGET_SPEEDUP, TARGET_FLOOR, TARGET_STACKED = 3.0, 1.3, 0.5  # ours ≥ 3× classic; ≤ 1.3× floor; 16 at ≥ 50 %
TARGET_TRACKING = 0.03  # MLflow logging on costs < 3 % of an epoch (test_tracking_overhead.py)


@pytest.fixture(scope="session", autouse=True)
def _flush_subnormals():
    """Training reads and writes subnormal floats as 0 on a CPU (bench.train.flush_subnormals), a
    process-wide mode: set here for the whole session, so that every loop (the classic one and the
    floor included) runs in the same mode whatever order the tests run in."""
    flush_subnormals(torch.device("cpu"))


def machine(load_at_start: float | None = None) -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],  # at the end of the run
            **({} if load_at_start is None else {"load_average_1_min_at_start": round(load_at_start, 2)})}


def summarize(benchmarks: list[dict], command: str, load_at_start: float | None = None) -> dict:
    """benchmarks: pytest-benchmark's dicts (name, stats, extra_info) -> rows, ratios and targets;
    `command`: the pytest command line that measured them; `load_at_start`: the 1-minute load average
    when it started."""
    rows = []
    for b in benchmarks:
        info = b.get("extra_info") or {}
        if "kind" not in info:
            continue
        ms, best = (1e3 * b["stats"][k] / info["steps"] for k in ("median", "min"))
        samples = 1e3 * info["batch"] * info["variants"]  # per step, × 1000 ms
        rows.append({**info, "name": b["name"], "rounds": b["stats"]["rounds"], "ms_per_step": ms,
                     "ms_per_step_best": best, "samples_per_s": samples / ms, "samples_per_s_best": samples / best,
                     "round_ms": [1e3 * t / info["steps"] for t in b["stats"].get("data", [])]})

    def find(kind, device, **match):
        return next((r for r in rows if r["kind"] == kind and r["device"] == device
                     and all(r.get(k) == v for k, v in match.items())), None)

    tracking = [(b.get("extra_info") or {})["tracking_overhead"] for b in benchmarks
                if "tracking_overhead" in (b.get("extra_info") or {})]
    for t in tracking:
        t["overhead_interval"] = median_interval(t["overhead_per_round"])
        t["verdict"] = tracking_verdict(t)
        s = t["samples_per_s"]
        if "logged_over_benchmark_per_round" in s:  # runs before it kept the ratio of medians only
            s["logged_over_benchmark_paired_interval"] = median_interval(s["logged_over_benchmark_per_round"])
    for t in tracking:  # the benchmark's samples/s from test_speed's row of the same run, if it ran
        ours = next((r for r in rows if r["kind"] == "ours" and r["device"] == t["device"]
                     and r["family"] == "bernoulli" and r["n_samples"] == 1), None)
        if ours:
            s = t["samples_per_s"]
            s["speed_row_median"], s["speed_row_best"] = ours["samples_per_s"], ours["samples_per_s_best"]
            s["logged_over_speed_row_median"] = s["logged_median"] / ours["samples_per_s"]
            s["logged_over_speed_row_best"] = s["logged_best"] / ours["samples_per_s_best"]
    ratios = {}
    for r in rows:
        paired = r.get("paired", {})
        if "floor" in paired:  # ours over the floor at its shapes (P outputs per pixel, L samples)
            r["x_floor"], r["x_floor_best"], _ = _over(r, "floor")
        if "bernoulli" in paired:  # a family's step over the Bernoulli's at the same L: what the family costs
            r["x_bernoulli"], r["x_bernoulli_best"], rounds = _over(r, "bernoulli")
            r["x_bernoulli_interval"] = median_interval(rounds)
        if "default" in paired:  # the step with one setting changed vs the default step
            r["default_speedup"], r["default_speedup_best"], rounds = _over(r, "default")
            r["default_speedup_interval"] = median_interval(rounds)
        if "single" in paired:  # a stacked step advances N variants: its step rate vs one ordinary variant's
            median, best, rounds = _over(r, "single")
            r["step_rate_vs_single"], r["step_rate_vs_single_best"] = 1 / median, 1 / best
            r["step_rate_vs_single_interval"] = median_interval([1 / x for x in rounds])
            r["throughput_vs_single"] = r["variants"] * r["step_rate_vs_single"]
    for device in sorted({r["device"] for r in rows}):
        ours = find("ours", device, family="bernoulli", n_samples=1)
        if not ours:
            continue
        d = ratios[device] = {}
        if "classic" in ours["paired"]:
            median, best, rounds = _over(ours, "classic")
            d["speedup_vs_classic_median"], d["speedup_vs_classic_best"] = 1 / median, 1 / best
            d["speedup_vs_classic_interval"] = i = median_interval([1 / x for x in rounds])
            d["target_speedup"] = verdict(i, lambda x: x >= TARGET_SPEEDUP, 1 / median, 1 / best)
        median, best, rounds = _over(ours, "floor")
        d["ours_over_floor_median"], d["ours_over_floor_best"] = median, best
        d["ours_over_floor_interval"] = i = median_interval(rounds)
        d["target_floor"] = verdict(i, lambda x: x <= TARGET_FLOOR, median, best)
        if "adam" in ours["paired"]:  # where the step's time goes: medians of the same rounds
            parts = {k: ours["paired"][k]["rounds"] for k in ("floor", "adam", "likelihood")}
            if len(ours["round_ms"]) == len(parts["floor"]):
                d["parts_ms"] = {k: statistics.median(v) for k, v in parts.items()}
                d["parts_ms"]["ours"] = ours["ms_per_step"]
                d["parts_ms"]["rest"] = statistics.median(
                    o - sum(p) for o, *p in zip(ours["round_ms"], *parts.values()))
            in_step, totals = ours.get("in_step_parts"), ours["paired"].get("in_step", {}).get("rounds")
            if in_step and all(len(ms) == len(totals) == len(parts["floor"]) for ms in in_step.values()):
                d["in_step_ms"] = {k: statistics.median(v) for k, v in in_step.items()}
                d["in_step_ms"]["step"] = statistics.median(totals)
                d["in_step_ms"]["rest"] = statistics.median(t - sum(p) for t, *p in zip(totals, *in_step.values()))
                d["in_step_ms"]["mlp_over_floor"] = statistics.median(
                    m / f for m, f in zip(in_step["mlp"], parts["floor"]))
                for part in ("likelihood", "adam"):  # the same rounds' part inside the step over the part alone
                    d["in_step_ms"][f"{part}_over_alone"] = statistics.median(
                        i / a for i, a in zip(in_step[part], parts[part]))
        if {"log_sigmoid", "torch_log_sigmoid"} <= ours["paired"].keys():  # our log σ against torch's, same rounds
            mine, torch_s = (ours["paired"][k]["rounds"] for k in ("log_sigmoid", "torch_log_sigmoid"))
            d["log_sigmoid_ms"] = {"ours": statistics.median(mine), "torch": statistics.median(torch_s)}
            torch_over_ours = [t / m for t, m in zip(torch_s, mine)]
            d["torch_log_sigmoid_over_ours_median"] = statistics.median(torch_over_ours)
            d["torch_log_sigmoid_over_ours_interval"] = median_interval(torch_over_ours)
        if probe := ours.get("core_to_core_ns_per_line"):  # test_speed.core_to_core_round, in the same rounds
            d["core_to_core_ns_per_line"] = {"median": statistics.median(probe), "range": [min(probe), max(probe)],
                                             "rounds": probe}
            if "in_step_ms" in d and len(probe) == len(ours["in_step_parts"]["adam"]):  # beside Adam inside the step
                d["core_to_core_ns_per_line"]["adam_in_step_ms"] = ours["in_step_parts"]["adam"]
        big = find("stacked", device, variants=16)
        if big and "step_rate_vs_single" in big and device == "cuda":
            d["stacked_16_step_rate_vs_single"] = rate = big["step_rate_vs_single"]
            d["stacked_16_step_rate_vs_single_interval"] = i = big["step_rate_vs_single_interval"]
            d["target_stacked"] = verdict(i, lambda x: x >= TARGET_STACKED, rate, big["step_rate_vs_single_best"])
    per_round = all(len(r["round_ms"]) == len(ref.get("rounds", [])) for r in rows for ref in r.get("paired", {}).values())
    return {"command": command, "per_round_ratios": per_round, "statistics": {
                "median": "times: median round / steps per round; ratios: "
                          + ("median over paired rounds" if per_round else "median over median"),
                "best": "times: fastest round / steps per round; ratios: fastest over fastest"},
            "machine": machine(load_at_start), "rows": rows, "ratios": ratios, "tracking_overhead": tracking,
            "targets": {"speedup_vs_classic": f">= {TARGET_SPEEDUP}", "ours_over_floor": f"<= {TARGET_FLOOR}",
                        "stacked_16_step_rate_vs_single (GPU)": f">= {TARGET_STACKED}",
                        "tracking_overhead": f"< {TARGET_TRACKING}"}}


def _over(r: dict, name: str) -> tuple[float, float, list[float]]:
    """A row's time over its paired reference `name`'s: the median over rounds of the ratio of its round
    to the reference round run right before it, its fastest round over the reference's fastest, and the
    per-round ratios. (A JSON written before the rounds were kept gives the ratio of the medians
    instead, and no rounds.)"""
    ref = r["paired"][name]
    ours = r.get("round_ms", [])
    if ours and len(ours) == len(ref.get("rounds", [])):
        rounds = [a / b for a, b in zip(ours, ref["rounds"])]
        return statistics.median(rounds), r["ms_per_step_best"] / ref["best"], rounds
    return r["ms_per_step"] / ref["median"], r["ms_per_step_best"] / ref["best"], []


def median_interval(values: list[float], coverage: float = 0.95) -> list[float] | None:
    """[low, high, its coverage]: a distribution-free confidence interval for the median of the
    population the rounds are drawn from, between the k-th smallest and k-th largest round, with the
    largest k whose coverage 1 − 2 P(Binomial(n, ½) < k) is at least `coverage` (order statistics;
    Conover, Practical Nonparametric Statistics, 3rd ed., §3.2). 12 rounds: the 3rd, 96.1 %. None for
    fewer than 6 rounds, which cannot reach 95 %."""
    xs, n = sorted(values), len(values)
    found = None
    for k in range(1, n // 2 + 1):
        covered = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
        if covered >= coverage:
            found = [xs[k - 1], xs[n - k], covered]
    return found


def verdict(interval: list[float] | None, meets, median: float, best: float) -> str:
    """Whether a target is met: by the median's confidence interval where there are rounds to compute
    it (a shared machine's rounds can spread wider than the margin to the target), else by the median
    and the best rounds."""
    if interval is None:
        if meets(median) and meets(best):
            return "met"
        return "met on the median only" if meets(median) else "met on the best rounds only" if meets(best) else "not met"
    low, high = meets(interval[0]), meets(interval[1])
    if low and high:
        return "met"
    return "not met" if not (low or high) else "not resolved on this machine: the interval spans the target"


def tracking_verdict(t: dict) -> str:
    """Whether logging costs < TARGET_TRACKING of an epoch. By the wall clock's paired rounds where their
    interval decides; where it spans the target (a VM's rounds spread by tens of percent, far wider
    than 3 %), by the logging's own time, counted in every round (test_tracking_overhead._Clock) as
    measured, with system metrics sampled more often than MLflow's own interval: met if it stayed below
    the target in every round. That count is not a bound: it leaves out what no thread's time shows
    (GIL hand-offs, caches), so the verdict names it."""
    wall = verdict(t["overhead_interval"], lambda x: x < TARGET_TRACKING, t["overhead_median"], t["overhead_best"])
    own = t.get("logging_time")
    if own is None or not wall.startswith("not resolved"):
        return wall
    counted = (f"the logging's own time {100 * own['median']:.2f} % (at most {100 * own['largest']:.2f} % in a round; "
               f"{100 * own['median_at_mlflow_rate']:.2f} % at MLflow's {own['mlflow_sampling_s']:g} s)")
    if own["largest"] < TARGET_TRACKING:
        return f"met by {counted}; the wall clock's interval spans the target on this machine"
    return f"not resolved: {counted}, and the wall clock's interval spans the target"


def _interval(d: dict, key: str, scale: float = 1.0, unit: str = "") -> str:
    """A ratio's or overhead's confidence interval for its median, as text ("" when there is none)."""
    i = d.get(key + "_interval")
    if i is None:
        return ""
    return f"{100 * i[2]:.0f} % interval of the median {scale * i[0]:.2f}{unit} to {scale * i[1]:.2f}{unit}; "


def markdown(summary: dict) -> str:
    m, rows = summary["machine"], summary["rows"]
    steps = rows[0]["steps"] if rows else "?"
    start = m.get("load_average_1_min_at_start")  # runs before it kept the end's alone
    busy = start is not None and start >= m["cores"]
    intro = (f"`{summary['command']}` on {m['cpu']} ({m['cores']} cores; torch {m['torch']}, {m['threads']} "
             f"threads{'; ' + m['gpu'] if m['gpu'] else ''}; load average "
             + ("" if start is None else f"{start} at the start, ") + f"{m['load_average_1_5_15_min'][0]} at the "
             "end)" + (f". **The machine was busy when the run started** (load average {start} on {m['cores']} "
                       "cores): other processes most likely took a share of its rounds" if busy else "")
             + ". A step is forward, backward and Adam on a batch of 128 MNIST images, 784-400-20 MLP; L samples "
             f"of z per image. Each figure is the median of the timed rounds of {steps} steps (in brackets: the "
             "fastest round), from the JSON the command wrote (`--benchmark-json`), key `vaebench`. " + (
             "Every ratio is taken in paired rounds of one test, a reference round right before each of ours: the "
             "median over rounds of the two rounds' ratio (in brackets: fastest over fastest), so that both sides "
             "see the same machine." if summary.get("per_round_ratios", True) else
             "Every ratio divides two timings taken in the same test, a reference round between two of ours, so "
             "that both see the same machine: their medians (in brackets: their fastest rounds)."))
    lines = ["### Training-step speed", "", intro, ""] if rows else []  # none when only the tracking test ran
    for device in sorted({r["device"] for r in rows}):
        dev = [r for r in rows if r["device"] == device]
        ours = {(r["family"], r["n_samples"]): r for r in dev if r["kind"] == "ours"}
        n_samples = sorted({L for _, L in ours})
        # runs before each family was paired with the Bernoulli's step have no such column
        columns = ["samples/s", "ms/step", "× floor"] + (["× bernoulli"] if any("x_bernoulli" in r for r in dev) else [])
        if ours:  # none when -k picked other rows only
            lines += [f"**{device}: our step (`bench.train.train_epoch`), per likelihood family**", "",
                      "| family | " + " | ".join(f"L={L} {c}" for L in n_samples for c in columns) + " |",
                      "|---" * (1 + len(columns) * len(n_samples)) + "|"]
        for family in dict.fromkeys(f for f, _ in ours):
            cells = []
            for L in n_samples:
                r = ours.get((family, L))
                family_cells = [_samples(r), _ms(r), _pair(r, "x_floor"),
                                "1" if family == "bernoulli" else _pair(r, "x_bernoulli")] if r else ["—"] * 4
                cells += family_cells[:len(columns)]
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        if ours and len(columns) == 4:
            lines += ["", ("× floor: the family's step over the GEMM floor at its shapes (the floor of two decoder "
                      "outputs per pixel for a family with two); × bernoulli: over the Bernoulli's step (on binary "
                      "pixels) at the same L, timed in the same test: what choosing the family costs. Rows of "
                      "different families were timed minutes apart: compare them by this column, not by their "
                      "ms/step.")]
        references = []
        for r in dev:
            if r["kind"] == "classic":
                references.append(f"| classic tutorial loop (DataLoader, per-item ToTensor, Bernoulli BCE) | 1 | "
                                  f"{_samples(r)} | {_ms(r)} |")
        for r in dev:
            if r["kind"] == "floor":
                how = " (one CUDA graph)" if device == "cuda" else ""
                references.append(f"| GEMM floor{how}, {r['n_params']} decoder output(s) per pixel | "
                                  f"{r['n_samples']} | {_samples(r)} | {_ms(r)} |")
        for r in dev:
            if r["kind"] == "ours_setting":
                references.append(f"| our step with `{r['setting']}`, {r['family']} | {r['n_samples']} | "
                                  f"{_samples(r)} | {_ms(r)} |")
        if references:  # none when -k picked our rows only
            lines += ["", "| reference | L | samples/s | ms/step |", "|---|---|---|---|", *references]
        d = summary["ratios"].get(device, {})
        lines.append("")
        head = next((r for r in dev if r["kind"] == "ours" and r["family"] == "bernoulli" and r["n_samples"] == 1),
                    None)
        paired = head["paired"] if head else {}
        if "speedup_vs_classic_median" in d:
            lines.append(f"- ours vs the classic loop (bernoulli, L = 1): **{_pair(d, 'speedup_vs_classic')}× "
                         f"faster** ({_interval(d, 'speedup_vs_classic')}target ≥ {TARGET_SPEEDUP:g}×: {d['target_speedup']}); paired rounds: "
                         f"ours {_ms(head)} ms/step, classic {_ms(paired['classic'])} ms/step")
        if "ours_over_floor_median" in d:
            lines.append(f"- ours vs the GEMM floor (bernoulli, L = 1): **{_pair(d, 'ours_over_floor')}×** the "
                         f"floor's time ({_interval(d, 'ours_over_floor')}target ≤ {TARGET_FLOOR:g}×: {d['target_floor']}); paired "
                         f"rounds: floor {_ms(paired['floor'])} ms/step")
        if "parts_ms" in d:
            p = d["parts_ms"]
            lines.append(f"- where our step's {p['ours']:.2f} ms go (bernoulli, L = 1; medians of the same rounds): "
                         f"the 11 matrix products (the floor) {p['floor']:.2f} ms, Adam's update of all parameters "
                         f"{p['adam']:.2f} ms, log p(x|z) and its gradient {p['likelihood']:.2f} ms, and "
                         f"{p['rest']:.2f} ms for the rest (the reparameterisation, KL, ReLUs, bias sums, data "
                         "transform, and the Python dispatch of each small operation"
                         + (", and what the parts take more inside the step than timed alone: next line" if
                            "in_step_ms" in d else "") + "); the floor target leaves "
                         f"{(TARGET_FLOOR - 1) * p['floor']:.2f} ms for all but the products")
        if "in_step_ms" in d:
            q = d["in_step_ms"]
            lines.append(f"- the same, timed inside the step (a copy of our round, {q['step']:.2f} ms/step, its parts "
                         f"timed where they run; medians of the same rounds): the two MLPs' passes (the 11 products "
                         f"with their ReLUs and bias sums) {q['mlp']:.2f} ms ({q['mlp_over_floor']:.2f}× the floor), "
                         f"log p(x|z) and its gradient {q['likelihood']:.2f} ms ({q['likelihood_over_alone']:.2f}× "
                         f"its time alone), Adam {q['adam']:.2f} ms ({q['adam_over_alone']:.2f}× alone), and "
                         f"{q['rest']:.2f} ms for the rest (the reparameterisation, KL, data transform, and the Python between "
                         "these parts)")
        if "log_sigmoid_ms" in d:
            g = d["log_sigmoid_ms"]
            spread = _interval(d, "torch_log_sigmoid_over_ours").removesuffix("; ")
            lines.append("- log σ of one batch's decoder logits (128 × 784, no gradient, as the Bernoulli's log p(x|z) "
                         f"takes it; medians of the same rounds): our formula (`models.likelihoods.log_sigmoid`) "
                         f"{g['ours']:.3f} ms, torch's `F.logsigmoid` {g['torch']:.3f} ms: torch's takes "
                         f"**{d['torch_log_sigmoid_over_ours_median']:.2f}×** our time" + (f" ({spread})" if spread else ""))
        if "core_to_core_ns_per_line" in d:
            c = d["core_to_core_ns_per_line"]
            lines.append(f"- cache lines between cores (what the step does with every parameter: both threads' products "
                         f"read them, then Adam writes them): a line one thread wrote, another thread's core read, and "
                         f"the first writes again costs **{_ns(c['median'])} ns** more than one that stays with its core "
                         f"(median of the same rounds; "
                         f"{_ns(c['range'][0])} to {_ns(c['range'][1])})" + (
                             "; round by round, beside Adam inside the step (ns per line / ms): " + ", ".join(
                                 f"{_ns(x)} / {ms:.2f}" for x, ms in zip(c["rounds"], c["adam_in_step_ms"]))
                             if "adam_in_step_ms" in c else ""))
        for r in dev:
            if r["kind"] != "ours_setting":
                continue
            # the faster of the two steps named first; a setting can beat the default (train.compile on a CPU)
            i = r.get("default_speedup_interval")
            if r["default_speedup"] >= 1:
                which = f"the default instead of `{r['setting']}`"
                median, best, low, high = r["default_speedup"], r["default_speedup_best"], *(i or [0, 0])[:2]
            else:
                which = f"`{r['setting']}` instead of the default"
                median, best = 1 / r["default_speedup"], 1 / r["default_speedup_best"]
                low, high = (1 / i[1], 1 / i[0]) if i else (0, 0)
            notes = [f"{100 * i[2]:.0f} % interval of the median {low:.2f} to {high:.2f}"] if i else []
            if best >= 1:
                pair = f"**{median:.2f} ({best:.2f})× faster**"
            else:  # fastest over fastest points the other way (one lucky round): in words, not "0.89× faster"
                pair = f"**{median:.2f}× faster**"
                notes.append(f"but fastest round against fastest round {1 / best:.2f}× slower")
            notes = f" ({'; '.join(notes)})" if notes else ""
            lines.append(f"- {which} ({r['family']}, L = {r['n_samples']}): {pair}{notes}; paired rounds: "
                         f"default {_ms(r['paired']['default'])} ms/step")
        stacked = [r for r in dev if r["kind"] == "stacked"]
        if stacked:
            header = ("| stacked variants N (bernoulli, L = 1) | ms/step | variant-samples/s | one variant's "
                      "ms/step (paired) | step rate vs one variant | throughput vs one variant |")
            lines += ["", header, "|---|---|---|---|---|---|"]
            for r in stacked:
                lines.append(f"| {r['variants']} | {_ms(r)} | {_samples(r)} | {_ms(r['paired']['single'])} | "
                             f"{r['step_rate_vs_single']:.2f} | {r['throughput_vs_single']:.2f}× |")
            if "target_stacked" in d:
                lines += ["", (f"- 16 stacked variants step at {d['stacked_16_step_rate_vs_single']:.2f} "
                               f"of one variant's rate ({_interval(d, 'stacked_16_step_rate_vs_single')}"
                               f"target ≥ {TARGET_STACKED:g}: {d['target_stacked']})")]
        lines.append("")
    for t in summary.get("tracking_overhead", []):
        lines += tracking_markdown(t, m, summary["command"])
    return "\n".join(lines)


def tracking_markdown(t: dict, m: dict, command: str) -> list[str]:
    """The MLflow logging overhead and the samples/s agreement (test_tracking_overhead.py)."""
    s, on, off = t["samples_per_s"], t["epoch_ms_on"], t["epoch_ms_off"]
    device = t.get("device", "cpu")
    where = m["gpu"] if device == "cuda" else m["cpu"]
    mlflow_async = t.get("mlflow_async_logging", True)  # how the runs before EpochLog's writer logged
    lines = [f"### MLflow logging overhead ({device})", "",
             (f"From `{command}` (`tests/benchmarks/test_tracking_overhead.py`), on {where}. `bench.train.train`, "
             f"bernoulli, batch {t['batch']}, 784-400-20, {t['train_images']} training images ({t['steps_per_epoch']} "
             f"steps) and {t['val_images']} validation images an epoch; {t['epochs_per_run']} epochs a run, the "
             f"last {t['timed_epochs_per_run']} timed: from the end of the first epoch to the end of the run's epoch "
             "logging (on: its last batch of epochs sent and written), per epoch. "
             "On: an MLflow child run in an SQLite store, started by `bench.tracking.start_child` "
             f"({_writer(mlflow_async)}, system metrics {_system_metrics(t)}), `on_epoch=bench.tracking.EpochLog(run_id)`, the runner's; "
             f"off: no tracking. {t['rounds']} timed rounds of on, each between two of off; the overhead is the "
             "median of the per-round (on − off) / off (in brackets: fastest round against fastest round), "
             "with a distribution-free confidence interval for that median; the target is met when all of "
             "the interval is below it."), "",
             "| epoch ms, off | epoch ms, on | overhead | interval of the median | per epoch | target |",
             "|---|---|---|---|---|---|",
             (f"| {off['median']:.1f} ({off['best']:.1f}) | {on['median']:.1f} ({on['best']:.1f}) | "
             f"**{100 * t['overhead_median']:+.2f} %** ({100 * t['overhead_best']:+.2f} %) | {_tracking_interval(t)} | "
             f"{t['overhead_ms_per_epoch']:+.2f} ms | < {100 * TARGET_TRACKING:g} %: {t['verdict']} |"), "",
             f"Per-round overheads: {', '.join(f'{100 * r:+.1f} %' for r in t['overhead_per_round'])}.", "",
             *_logging_time(t.get("logging_time"), mlflow_async),
             ("samples/s, bernoulli L = 1, median (best): what the runner logs (`samples_per_s` of `train`, an "
             "epoch's images over its wall-clock time, read back from the MLflow store) and the benchmark's own "
             "(test_speed.py's round of ours, 20 steps of `train_epoch` timed from outside, in the same rounds):"),
             "",
             "| logged to MLflow | benchmark, same rounds | logged / benchmark |", "|---|---|---|",
             (f"| {s['logged_median']:,.0f} ({s['logged_best']:,.0f}) | {s['benchmark_wall_median']:,.0f} "
             f"({s['benchmark_wall_best']:,.0f}) | {s['logged_over_benchmark_median']:.3f} "
             f"({s['logged_over_benchmark_best']:.3f}) |")]
    if "speed_row_median" in s:
        lines.append(f"| (test_speed.py's row, measured minutes apart) | {s['speed_row_median']:,.0f} "
                     f"({s['speed_row_best']:,.0f}) | {s['logged_over_speed_row_median']:.3f} "
                     f"({s['logged_over_speed_row_best']:.3f}) |")
    lines += ["", ("The rows of the speed table above were measured minutes apart from these, and a shared "
              "machine's speed drifts in between; only the same-rounds ratio compares like with like. "
              f"In the same rounds, `train_epoch`'s own samples_per_s over the one timed from outside: "
              f"{s['reported_over_wall_same_rounds']:.3f}."), ""]
    if "logged_over_benchmark_per_round" in s:
        i = s["logged_over_benchmark_paired_interval"]
        spread = ("no interval: too few rounds" if i is None
                  else f"{100 * i[2]:.0f} % interval of the median {i[0]:.3f} to {i[1]:.3f}")
        lines += [(f"Round by round (each logged run's median epoch over the benchmark round right before it, "
                   f"as the suite's other ratios): logged / benchmark **{s['logged_over_benchmark_paired_median']:.3f}**"
                   f" ({spread}); per round: {', '.join(f'{r:.3f}' for r in s['logged_over_benchmark_per_round'])}."),
                  ""]
    return lines


def _writer(mlflow_async: bool) -> str:
    """Which thread wrote the epochs: older results were measured with MLflow's asynchronous logging."""
    return "asynchronous logging" if mlflow_async else "epochs written by EpochLog's thread"


def _logging_time(own: dict | None, mlflow_async: bool) -> list[str]:
    """The logging's own time (test_tracking_overhead._Clock), where it was counted."""
    if own is None:
        return []
    every = f"{own['mlflow_sampling_s']:g} s"
    threads = "MLflow's asynchronous logging and its system-metrics sampler" if mlflow_async else \
        "EpochLog's writer and MLflow's system-metrics sampler, which writes its own samples"
    scaled = ("the sampler thread's own CPU scaled to that rate, the writing of its samples (in MLflow's "
              "logging threads) still counted in full:") if mlflow_async else \
        "the sampler thread's CPU, its writes included, scaled to that rate:"
    return [("The logging's own time, counted in the same rounds of on: the main thread's wall time in the "
             "logging calls (EpochLog, and its flush and wait at the end, whose wait also counts as the "
             f"CPU it waits for), plus the CPU time of the process's threads that do not train ({threads}; "
             "the process's CPU time less the main "
             "thread's and torch's own threads'). While training keeps every core busy, this is what "
             "logging can take from it, unless it also slows it in ways no thread's time shows (caches, "
             "GIL hand-offs): the wall clock above is the check on those, within its interval. As a share "
             "of the round's epoch without it, with system metrics sampled as in these runs, and at "
             f"MLflow's own {every}, which users get: {scaled}"), "",
            ("| main thread, ms/epoch | other threads' CPU, ms/epoch | of which the sampler's | other threads' "
             "CPU with logging off | share of the epoch: median (largest round) | "
             f"at MLflow's {every}: median (largest round) |"),
            "|---|---|---|---|---|---|",
            (f"| {own['main_ms_per_epoch']:.2f} | {own['threads_ms_per_epoch']:.2f} | "
             f"{own['sampler_ms_per_epoch']:.2f} | {own['off_threads_ms_per_epoch']:.2f} | "
             f"**{100 * own['median']:.2f} %** ({100 * own['largest']:.2f} %) | "
             f"{100 * own['median_at_mlflow_rate']:.2f} % ({100 * own['largest_at_mlflow_rate']:.2f} %) |"), ""]


def _system_metrics(t: dict) -> str:
    """How the runs' system metrics were sampled. Runs from before test_tracking_overhead.SYSTEM_METRICS_S
    sampled none: MLflow's 10 s interval was longer than each run."""
    if not t["system_metrics"]:
        return "off"
    if "system_metrics_sampling_s" in t:
        return (f"on, sampled every {t['system_metrics_sampling_s']:g} s instead of MLflow's 10 s, "
                f"{t['system_metric_samples_per_run']:g} samples a run: an upper bound on their cost")
    return ("on, but at MLflow's 10 s sampling interval, longer than these runs: no system metric was "
            "sampled, so their cost is not in these figures")


def _tracking_interval(t: dict) -> str:
    i = t["overhead_interval"]
    return "—" if i is None else f"{100 * i[0]:+.2f} % to {100 * i[1]:+.2f} % ({100 * i[2]:.0f} %)"


def _ns(x: float) -> str:
    """ns to one decimal, 0.0 for a round's noise just below 0 (not -0.0)."""
    return f"{round(x, 1) + 0.0:.1f}"


def _ms(r: dict) -> str:
    """A row's ms/step, or a paired reference's: median (best)."""
    if "median" in r:
        return f"{r['median']:.2f} ({r['best']:.2f})"
    return f"{r['ms_per_step']:.2f} ({r['ms_per_step_best']:.2f})"


def _samples(r: dict) -> str:
    return f"{r['samples_per_s']:,.0f} ({r['samples_per_s_best']:,.0f})"


def _pair(d: dict, key: str) -> str:
    """A ratio from the median rounds, with the best rounds' in brackets ('—' when absent)."""
    if key in d:
        return f"{d[key]:.2f} ({d[key + '_best']:.2f})"
    return f"{d[key + '_median']:.2f} ({d[key + '_best']:.2f})" if key + "_median" in d else "—"


def _command(config) -> str:
    """The command line of this run, as a reader would type it again."""
    venv = Path(__file__).resolve().parents[2] / ".venv"
    python = ".venv/bin/python" if Path(sys.executable).is_relative_to(venv) else "python"
    return " ".join([python, "-m pytest", shlex.join(config.invocation_params.args)])


def pytest_configure(config):
    """A --benchmark-json path that cannot be written is refused before anything runs: found when the
    results are saved, after the whole run, it lost them with their summary. Notes the load average before
    anything runs, so that the Markdown can say a run started on a busy machine."""
    config._vaebench_load_at_start = os.getloadavg()[0]
    path = config.getoption("benchmark_json", None)
    if path is None:
        return
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders still to be made
        folder = folder.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise pytest.UsageError(f"--benchmark-json={path}: " + (
            "a folder; expected a file's path (e.g. reports/benchmarks/cpu.json)" if path.is_dir() else
            f"{folder} is not a writable folder; expected a path in a folder you can write to"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A run in which a test failed (or that was interrupted) writes neither the JSON nor its Markdown:
    pytest-benchmark would save the benchmarks that passed, and a partial run (say, the floor alone when
    the data is missing) would replace the committed results. Runs before pytest-benchmark's own
    sessionfinish, which saves."""
    bench = getattr(session.config, "_benchmarksession", None)
    if exitstatus != 0 and bench is not None and bench.json:
        session.config._vaebench_not_written = bench.json
        bench.json = None  # the path pytest-benchmark reads when it saves
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    summary = output_json["vaebench"] = summarize(output_json["benchmarks"], _command(config),
                                                  config._vaebench_load_at_start)
    config._vaebench_summary = summary
    path = config.getoption("benchmark_json")  # a path (pytest-benchmark ≥ 5.3), None for --benchmark-save
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).with_suffix(".md").write_text(markdown(summary))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    summary = getattr(config, "_vaebench_summary", None)
    if summary is None:
        session = getattr(config, "_benchmarksession", None)
        benchmarks = [b.as_dict(include_data=True) for b in (session.benchmarks if session else []) if b]
        if not benchmarks:
            return
        summary = summarize(benchmarks, _command(config), config._vaebench_load_at_start)
    if summary["rows"] or summary.get("tracking_overhead"):
        terminalreporter.write_sep("=", "vaebench speed summary")
        terminalreporter.write_line(markdown(summary))
    not_written = getattr(config, "_vaebench_not_written", None)
    if not_written is not None:
        terminalreporter.write_line(f"{not_written} and its .md NOT written: a test failed or the run was "
                                    "interrupted; the results there are left as they were", red=True, bold=True)
