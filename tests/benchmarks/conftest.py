"""The benchmarks' summary: per-row samples/s and ms/step, ours vs the classic loop, ours vs the GEMM
floor, the stacked variants' step rate. Added to the JSON under "vaebench", rendered as
README_SECTION.md beside the JSON, and printed at the end of the run. Every number is the median
round of a benchmark in that JSON, divided by its steps per round."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

COMMAND = ".venv/bin/python -m pytest tests/benchmarks --benchmark-only --benchmark-json=reports/benchmarks/cpu.json"
TARGET_SPEEDUP, TARGET_FLOOR, TARGET_STACKED = 3.0, 1.3, 0.5  # ours ≥ 3× classic; ≤ 1.3× floor; 16 at ≥ 50 %


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def summarize(benchmarks: list[dict]) -> dict:
    """benchmarks: pytest-benchmark's dicts (name, stats, extra_info) -> rows, ratios and targets."""
    rows = []
    for b in benchmarks:
        info = b.get("extra_info") or {}
        if "kind" not in info:
            continue
        ms = 1e3 * b["stats"]["median"] / info["steps"]
        rows.append({**info, "name": b["name"], "ms_per_step": ms,
                     "ms_per_step_min": 1e3 * b["stats"]["min"] / info["steps"], "rounds": b["stats"]["rounds"],
                     "samples_per_s": 1e3 * info["batch"] * info["variants"] / ms})

    def find(kind, device, **match):
        return next((r for r in rows if r["kind"] == kind and r["device"] == device
                     and all(r.get(k) == v for k, v in match.items())), None)

    ratios = {}
    for device in sorted({r["device"] for r in rows}):
        for r in rows:  # each row of ours against the floor of its shapes (P outputs per pixel, L samples)
            floor = find("floor", device, n_params=r.get("n_params"), n_samples=r.get("n_samples"))
            if r["kind"] == "ours" and r["device"] == device and floor:
                r["x_floor"] = r["ms_per_step"] / floor["ms_per_step"]
        ours = find("ours", device, family="bernoulli", n_samples=1)
        classic, floor = find("classic", device), find("floor", device, n_params=1, n_samples=1)
        if not ours:
            continue
        d = ratios[device] = {"ours_ms_per_step": ours["ms_per_step"]}
        if classic:
            d["speedup_vs_classic"] = classic["ms_per_step"] / ours["ms_per_step"]
            d["target_speedup_met"] = d["speedup_vs_classic"] >= TARGET_SPEEDUP
        if floor:
            d["ours_over_floor"] = ours["ms_per_step"] / floor["ms_per_step"]
            d["target_floor_met"] = d["ours_over_floor"] <= TARGET_FLOOR
        for r in rows:
            if r["kind"] == "stacked" and r["device"] == device:
                # a stacked step advances N variants; its step rate relative to one ordinary variant's
                r["step_rate_vs_single"] = ours["ms_per_step"] / r["ms_per_step"]
                r["throughput_vs_single"] = r["variants"] * r["step_rate_vs_single"]
        big = find("stacked", device, variants=16)
        if big and device == "cuda":
            d["target_stacked_met"] = big["step_rate_vs_single"] >= TARGET_STACKED
    return {"command": COMMAND, "statistic": "median round / steps per round", "machine": machine(),
            "rows": rows, "ratios": ratios,
            "targets": {"speedup_vs_classic": f">= {TARGET_SPEEDUP}", "ours_over_floor": f"<= {TARGET_FLOOR}",
                        "stacked_16_step_rate_vs_single (GPU)": f">= {TARGET_STACKED}"}}


def markdown(summary: dict) -> str:
    m, rows = summary["machine"], summary["rows"]
    steps = rows[0]["steps"] if rows else "?"
    intro = (f"`{summary['command']}` on {m['cpu']} ({m['cores']} cores; torch {m['torch']}, {m['threads']} "
             f"threads{'; ' + m['gpu'] if m['gpu'] else ''}). A step is forward, backward and Adam on a batch of "
             "128 MNIST images, 784-400-20 MLP; L samples of z per image. Each figure is the median of the timed "
             f"rounds of {steps} steps, from `reports/benchmarks/*.json` (key `vaebench`).")
    lines = ["### Training-step speed", "", intro, ""]
    for device in sorted({r["device"] for r in rows}):
        dev = [r for r in rows if r["device"] == device]
        ours = {(r["family"], r["n_samples"]): r for r in dev if r["kind"] == "ours"}
        n_samples = sorted({L for _, L in ours})
        lines += [f"**{device}: our step (`bench.train.train_epoch`), per likelihood family**", "",
                  "| family | " + " | ".join(f"L={L} samples/s | L={L} ms/step | L={L} × floor" for L in n_samples)
                  + " |", "|---" * (1 + 3 * len(n_samples)) + "|"]
        for family in dict.fromkeys(f for f, _ in ours):
            cells = []
            for L in n_samples:
                r = ours.get((family, L))
                cells += ([f"{r['samples_per_s']:,.0f}", f"{r['ms_per_step']:.2f}",
                           f"{r['x_floor']:.2f}" if "x_floor" in r else "—"] if r else ["—"] * 3)
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        lines += ["", "| reference | L | samples/s | ms/step |", "|---|---|---|---|"]
        for r in dev:
            if r["kind"] == "classic":
                lines.append(f"| classic tutorial loop (DataLoader, per-item ToTensor, Bernoulli BCE) | 1 | "
                             f"{r['samples_per_s']:,.0f} | {r['ms_per_step']:.2f} |")
        for r in dev:
            if r["kind"] == "floor":
                lines.append(f"| GEMM floor, {r['n_params']} decoder output(s) per pixel | {r['n_samples']} | "
                             f"{r['samples_per_s']:,.0f} | {r['ms_per_step']:.2f} |")
        d = summary["ratios"].get(device, {})
        lines.append("")
        if "speedup_vs_classic" in d:
            lines.append(f"- ours vs the classic loop (bernoulli, L = 1): **{d['speedup_vs_classic']:.2f}× faster** "
                         f"(target ≥ {TARGET_SPEEDUP:g}×: {'met' if d['target_speedup_met'] else 'not met'})")
        if "ours_over_floor" in d:
            lines.append(f"- ours vs the GEMM floor (bernoulli, L = 1): **{d['ours_over_floor']:.2f}×** the floor's "
                         f"time (target ≤ {TARGET_FLOOR:g}×: {'met' if d['target_floor_met'] else 'not met'})")
        stacked = [r for r in dev if r["kind"] == "stacked"]
        if stacked:
            header = ("| stacked variants N (bernoulli, L = 1) | ms/step | variant-samples/s | "
                      "step rate vs one variant | throughput vs one variant |")
            lines += ["", header, "|---|---|---|---|---|"]
            for r in stacked:
                lines.append(f"| {r['variants']} | {r['ms_per_step']:.2f} | {r['samples_per_s']:,.0f} | "
                             f"{r.get('step_rate_vs_single', float('nan')):.2f} | "
                             f"{r.get('throughput_vs_single', float('nan')):.2f}× |")
        lines.append("")
    return "\n".join(lines)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    summary = output_json["vaebench"] = summarize(output_json["benchmarks"])
    config._vaebench_summary = summary
    path = config.getoption("benchmark_json")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (Path(path).parent / "README_SECTION.md").write_text(markdown(summary))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    summary = getattr(config, "_vaebench_summary", None)
    if summary is None:
        session = getattr(config, "_benchmarksession", None)
        benchmarks = [b.as_dict(include_data=False) for b in (session.benchmarks if session else []) if b]
        if not benchmarks:
            return
        summary = summarize(benchmarks)
    if summary["rows"]:
        terminalreporter.write_sep("=", "vaebench speed summary")
        terminalreporter.write_line(markdown(summary))
