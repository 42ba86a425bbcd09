"""The robust-aggregation case: each robust rule against FedAvg in the same run.

For one (parameters, sites), the same clients (``benchmarks/round_clients.py``, every
site sending the same fixed delta) run rounds against a fresh ``fedmae serve
--strategy RULE`` per rule, rules alternated ``repeats`` times (the load of a shared
machine drifts). Reported per rule, as a ratio to FedAvg: the round time, the
aggregation step alone (the round log's ``aggregation_s``) and the aggregator's peak
RSS. The needs-all rules' extra memory is bounded by 32 bytes x sites x block plus a
fixed workspace of at most 16 MB (``aggregator_service/strategies/robust.py``), not by
sites x model.

A whole process's peak RSS varies by tens of MB from run to run, more than that
bound; so ``aggregation_peaks`` also measures each rule's aggregate alone, in this
process, as the rise of the peak RSS above the RSS before it (the peak is reset through
``/proc/self/clear_refs``), on the same store of random updates.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aggregator_service.strategies import make_strategy
from aggregator_service.strategies.robust import BLOCK
from aggregator_service.update_store import UpdateStore
from benchmarks.cases import RoundsRun, run_rounds

WORKSPACE_MB = 16  # sort and BLAS scratch, allocated once per process (measured 10-16)
RULES = ("fedavg", "median", "trimmed-mean", "multi-krum", "norm-bounded")


def bench_robust(params: int, sites: int, rounds: int = 3, repeats: int = 1) -> dict:
    """Round time, aggregation time and peak RSS of each rule, and their ratios to
    FedAvg's (medians over the repeats and their timed rounds)."""
    runs: dict[str, list[RoundsRun]] = {rule: [] for rule in RULES}
    for _ in range(repeats):
        for rule in RULES:
            runs[rule].append(run_rounds(params, sites, rounds, serve_args=("--strategy", rule)))
    figures = {rule: _figures(rs) for rule, rs in runs.items()}
    peaks = aggregation_peaks(params, sites)
    base = figures["fedavg"]
    for f in figures.values():
        f["round_ratio"] = f["round_s"] / base["round_s"]
        f["aggregation_ratio"] = f["aggregation_s"] / max(base["aggregation_s"], 1e-3)
        f["rss_ratio"] = f["peak_rss_MB"] / base["peak_rss_MB"]
        f["rss_extra_MB"] = f["peak_rss_MB"] - base["peak_rss_MB"]
    return {
        "params": params, "sites": sites, "rounds": rounds, "repeats": repeats,
        "model_MB": params * 4 / 1e6, "block": BLOCK,
        "block_bound_MB": 32 * sites * BLOCK / 1e6 + WORKSPACE_MB, "rules": figures,
        "in_process": peaks,
    }  # fmt: skip


def _rss_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def aggregation_peaks(params: int, sites: int) -> dict[str, dict[str, float]]:
    """Each rule's aggregation of ``sites`` random updates of ``params`` values, in this
    process: seconds, and MB of peak RSS above the RSS before it. FedAvg folds the same
    updates in (one receive buffer, reused) and aggregates; a needs-all rule reads them
    from an ``UpdateStore``, as in a round."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(params, generator=g)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedmae-bench-robust-") as tmp:
        with UpdateStore(Path(tmp) / "u.f32", params, sites) as store:
            delta = torch.empty(params)
            for _ in range(sites):
                store.append(delta.normal_(generator=g).mul_(0.01), 1)
            for rule in RULES:
                strategy = make_strategy(rule)
                Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
                before, t0 = _rss_kb("VmRSS"), time.perf_counter()
                if strategy.needs_all_updates:
                    result = strategy.aggregate(theta, store)
                else:
                    strategy.begin_round(params)
                    for _ in range(sites):
                        strategy.accumulate(delta, 1)
                    result = strategy.aggregate(theta)
                seconds = time.perf_counter() - t0
                out[rule] = {"seconds": seconds, "peak_MB": (_rss_kb("VmHWM") - before) / 1e3}
                del result, strategy
    base = out["fedavg"]
    for f in out.values():
        f["extra_MB"] = f["peak_MB"] - base["peak_MB"]
        f["time_ratio"] = f["seconds"] / base["seconds"]
    return out


def _figures(runs: list[RoundsRun]) -> dict:
    timed = [r for run in runs for r in (run.records[1:] if len(run.records) > 1 else run.records)]
    return {
        "round_s": statistics.median(r["duration_s"] for r in timed),
        "aggregation_s": statistics.median(r["phases"].get("aggregation_s", 0.0) for r in timed),
        "peak_rss_MB": statistics.median(run.peak_rss for run in runs) / 1e6,
        "published": sum(r["status"] == "published" for run in runs for r in run.records),
    }


def robust_rows(r: dict) -> list[list[str]]:
    """Summary-table rows: each robust rule's round time and peak RSS against FedAvg's."""
    size = f"{r['params'] / 1e6:.0f} M × {r['sites']} sites"
    base = r["rules"]["fedavg"]
    peaks = r.get("in_process", {})
    rows = []
    for rule, f in r["rules"].items():
        if rule == "fedavg":
            continue
        extra = peaks.get(rule, {}).get("extra_MB")
        rows.append([
            f"{rule} round (time, RSS), {size}",
            f"{f['round_s']:.2f} s, {f['peak_rss_MB']:.0f} MB",
            f"fedavg: {base['round_s']:.2f} s, {base['peak_rss_MB']:.0f} MB",
            f"{f['round_ratio']:.2f} / {f['rss_ratio']:.2f}",
            f"aggregation ≤ fedavg's + {r['block_bound_MB']:.0f} MB (32 B × sites × block "
            "+ 16 MB)",
            "-" if extra is None else
            f"{'met' if extra <= r['block_bound_MB'] else '**missed**'} ({extra:+.0f} MB)",
        ])  # fmt: skip
    return rows


def robust_section(results: dict) -> list[str]:
    """Docs lines: every rule's figures against FedAvg's, one column per size."""
    runs = results["cases"].get("robust")
    if not runs:
        return []
    m = results.get("machine_of", {}).get("robust")
    lines = ["## Robust aggregation", ""]
    if m:
        lines += ["Measured in a run of its own (`python -m benchmarks.run --only robust "
                  f"--into ...`): {m['cores']} cores ({m['cpu']}), {m['time']}, load average "
                  f"at start {m['load_avg']:.1f}.", ""]  # fmt: skip
    for r in runs:
        lines += [f"{r['params'] / 1e6:.0f} M parameters ({r['model_MB']:.0f} MB) × "
                  f"{r['sites']} sites, {r['rounds']} rounds × {r['repeats']} repeats; block "
                  f"{r['block']:,} coordinates, so the bound on a needs-all rule's extra "
                  "memory is 32 B × sites × block + 16 MB of workspace = "
                  f"{r['block_bound_MB']:.0f} MB.", "",
                  "| rule | round (s) | aggregation (s) | peak RSS (MB) | round / fedavg "
                  "| aggregation / fedavg | RSS / fedavg (extra MB) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for rule, f in r["rules"].items():
            lines.append(
                f"| {rule} | {f['round_s']:.2f} | {f['aggregation_s']:.2f} | "
                f"{f['peak_rss_MB']:.0f} | {f['round_ratio']:.2f} | "
                f"{f['aggregation_ratio']:.2f} | {f['rss_ratio']:.2f} "
                f"({f['rss_extra_MB']:+.0f}) |"
            )
        lines.append("")
        if r.get("in_process"):
            lines += ["Each rule's aggregation alone, in one process over the same store of "
                      "random updates (`aggregation_peaks`): seconds, and the rise of peak "
                      "RSS while it runs (FedAvg's is its model-sized accumulator; a "
                      "needs-all rule's its model-sized output plus the blocks).", "",
                      "| rule | seconds | / fedavg | peak rise (MB) | − fedavg's (MB) |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for rule, f in r["in_process"].items():
                lines.append(f"| {rule} | {f['seconds']:.2f} | {f['time_ratio']:.1f} | "
                             f"{f['peak_MB']:.0f} | {f['extra_MB']:+.0f} |")  # fmt: skip
            lines.append("")
    lines += [
        "Every site sends the same delta: the figures are the rules' cost, not their "
        "robustness (tests/unit/test_robust_strategies.py, "
        "tests/integration/test_robust_rounds.py). `aggregation` is the round log's "
        "`aggregation_s`: reading the spilled updates back and computing the step."
    ]
    return [*lines, ""]
