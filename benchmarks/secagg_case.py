"""The secure-aggregation case: secure rounds against plain ones in the same run.

For one (parameters, sites), the same clients (``benchmarks/round_clients.py``) send
the same delta in plain rounds, then in secure ones, alternated (a fresh aggregator with
``--secure-aggregation``, so each half's peak RSS is its own). The targets, from the
issue: a secure round in at most 1.5 x the plain round's time, and the aggregator's
peak RSS at most the plain peak + 2 x the model (params x 4 bytes).
"""

from __future__ import annotations

import statistics

from benchmarks.cases import RoundsRun, run_rounds

TIME_TARGET = 1.5  # secure round time / plain round time
RSS_TARGET_MODELS = 2.0  # (secure peak - plain peak) / model size


def bench_secagg(params: int, sites: int, rounds: int = 4, repeats: int = 2) -> dict:
    """Plain and secure runs alternated ``repeats`` times (the load of a shared machine
    drifts): round times are the median over all their timed rounds, peak RSS the
    median of the runs' peaks."""
    plains, secures = [], []
    for _ in range(repeats):
        plains.append(run_rounds(params, sites, rounds))
        secures.append(run_rounds(params, sites, rounds, secure=True))
    model_bytes = params * 4
    plain_s, secure_s = _round_s(plains), _round_s(secures)
    plain_rss = statistics.median(run.peak_rss for run in plains)
    secure_rss = statistics.median(run.peak_rss for run in secures)
    ratio = secure_s / plain_s
    extra_models = (secure_rss - plain_rss) / model_bytes
    secure_sites = [site for run in secures for site in run.sites.values()]
    masking = [s for site in secure_sites for s in site["mask_cpu_s"]]
    masking_wall = [s for site in secure_sites for s in site["mask_wall_s"]]
    per_site = rounds * sites * repeats
    return {
        "params": params, "sites": sites, "rounds": rounds, "repeats": repeats,
        "model_MB": model_bytes / 1e6,
        "plain_round_s": plain_s, "secure_round_s": secure_s,
        "time_ratio": ratio, "time_target": TIME_TARGET,
        "plain_peak_rss_MB": plain_rss / 1e6, "secure_peak_rss_MB": secure_rss / 1e6,
        "plain_peak_rss_runs_MB": [run.peak_rss / 1e6 for run in plains],
        "secure_peak_rss_runs_MB": [run.peak_rss / 1e6 for run in secures],
        "rss_extra_models": extra_models, "rss_target_models": RSS_TARGET_MODELS,
        "plain_upload_bytes_per_site_round": _per(plains, "upload_bytes", per_site),
        "secure_upload_bytes_per_site_round": _per(secures, "upload_bytes", per_site),
        "secure_message_bytes_per_site_round": _per(secures, "message_bytes", per_site),
        "mask_cpu_s": statistics.median(masking) if masking else None,
        "mask_wall_s": statistics.median(masking_wall) if masking_wall else None,
        "plain_phases_s": _phases(plains), "secure_phases_s": _phases(secures),
        "plain_durations_s": [r["duration_s"] for run in plains for r in run.records],
        "secure_durations_s": [r["duration_s"] for run in secures for r in run.records],
        "met": ratio <= TIME_TARGET and extra_models <= RSS_TARGET_MODELS,
    }  # fmt: skip


def _timed(runs: list[RoundsRun]) -> list[dict]:
    """Each run's records after its first round (which also warms connections and the
    page cache), as in ``RoundsRun.round_s``."""
    return [r for run in runs for r in (run.records[1:] if len(run.records) > 1 else run.records)]


def _round_s(runs: list[RoundsRun]) -> float:
    return statistics.median(r["duration_s"] for r in _timed(runs))


def _per(runs: list[RoundsRun], key: str, count: int) -> float:
    return sum(site.get(key, 0) for run in runs for site in run.sites.values()) / count


def _phases(runs: list[RoundsRun]) -> dict[str, float]:
    """Median seconds of each step the aggregator timed (its round log's ``phases``)."""
    timed = _timed(runs)
    keys = [k for k in timed[0].get("phases", {}) if k != "waiting_s"]
    return {k: statistics.median(r["phases"].get(k, 0.0) for r in timed) for k in keys}
