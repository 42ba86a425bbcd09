"""Turn benchmark results into the ratio table, PNG plots and docs/BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.robust_case import robust_rows, robust_section  # noqa: E402


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def summary_rows(results: dict) -> list[list[str]]:
    c = results["cases"]
    rows = []
    if "kernel" in c:
        k = c["kernel"]
        rows.append([
            f"aggregation kernel ({k['updates']} × {k['params'] / 1e6:.0f} M)",
            f"{k['ours_GBps']:.1f} GB/s", f"bare add_: {k['baseline_GBps']:.1f} GB/s",
            f"{k['ratio']:.2f}", "≥ 0.8", _met(k["ratio"] >= 0.8),
        ])  # fmt: skip
    if "transfer" in c:
        t = c["transfer"]
        rows.append([
            f"SubmitUpdate ({t['params'] / 1e6:.0f} M fp32, mTLS)",
            f"{t['upload_MiBps']:.0f} MiB/s",
            f"raw stream: {t['raw_upload_MiBps']:.0f} MiB/s", f"{t['upload_ratio']:.2f}", "≥ 0.8",
            _met(t["upload_ratio"] >= 0.8),
        ])  # fmt: skip
        rows.append([
            f"FetchModel ({t['params'] / 1e6:.0f} M fp32, mTLS)", f"{t['fetch_MiBps']:.0f} MiB/s",
            f"raw stream: {t['raw_fetch_MiBps']:.0f} MiB/s", f"{t['fetch_ratio']:.2f}", "≥ 0.8",
            _met(t["fetch_ratio"] >= 0.8),
        ])  # fmt: skip
    for r in c.get("rounds", []):
        rows.append(_round_row(f"round, {r['params'] / 1e6:.0f} M × {r['clients']} clients", r))
    if "many_clients" in c:
        rows.append(_round_row(f"round, tiny MAE × {c['many_clients']['clients']} clients",
                               c["many_clients"]))  # fmt: skip
    if "big_model" in c:
        b = c["big_model"]
        ok = b["peak_rss_MB"] <= 4 * b["model_MB"]
        rows.append([
            f"big model ({b['params'] / 1e6:.0f} M = {b['model_MB'] / 1e3:.1f} GB) × 2 clients",
            f"{b['round_s']:.1f} s/round, RSS {b['peak_rss_MB'] / 1e3:.1f} GB",
            f"4 × model = {4 * b['model_MB'] / 1e3:.1f} GB",
            f"{b['peak_rss_MB'] / b['model_MB']:.2f} × model", "≤ 4 × model", _met(ok),
        ])  # fmt: skip
    if "encodings" in c:
        for enc, e in c["encodings"].items():
            if enc == "fp32":
                continue
            # "within 2 %": not worse than fp32 by more than 2 % (a lower loss is fine;
            # run-to-run noise of the training itself is a few %).
            ok = e["bytes_ratio"] <= 0.27 and e["eval_loss_ratio"] <= 1.02
            rows.append([
                f"encoding {enc} (bytes, final eval loss)",
                f"{e['bytes_in_per_round'] / 1e6:.1f} MB/round, loss {e['final_eval_loss']:.4f}",
                f"fp32: {c['encodings']['fp32']['bytes_in_per_round'] / 1e6:.1f} MB, "
                f"{c['encodings']['fp32']['final_eval_loss']:.4f}",
                f"{e['bytes_ratio']:.3f} / {e['eval_loss_ratio']:.3f}",
                "int8: ≤ 0.27 / ≤ 1.02" if enc == "int8" else "-",
                _met(ok) if enc == "int8" else "-",
            ])  # fmt: skip
    for r in c.get("secagg", []):
        rows += secagg_rows(r)
    for r in c.get("robust", []):
        rows += robust_rows(r)
    if "training" in c:
        t = c["training"]
        rows.append([
            "local training (tiny MAE, 1 thread)", f"{t['ours_img_s']:.0f} img/s",
            f"plain torch loop: {t['plain_img_s']:.0f} img/s", f"{1 + t['overhead']:.3f} × time",
            "overhead ≤ 5 %", _met(t["overhead"] <= 0.05),
        ])  # fmt: skip
    return rows


def secagg_rows(r: dict) -> list[list[str]]:
    """A secure round against the plain one of the same run: time, and peak RSS."""
    size = f"{r['params'] / 1e6:.0f} M × {r['sites']} sites"
    extra = r["rss_extra_models"]
    return [
        [
            f"secure round, {size}", f"{r['secure_round_s']:.2f} s/round",
            f"plain round: {r['plain_round_s']:.2f} s", f"{r['time_ratio']:.2f}", "≤ 1.5",
            _met(r["time_ratio"] <= r["time_target"]),
        ],
        [
            f"secure round RSS, {size}", f"{r['secure_peak_rss_MB']:.0f} MB",
            f"plain round: {r['plain_peak_rss_MB']:.0f} MB", f"{extra:+.2f} × model",
            "≤ +2 × model", _met(extra <= r["rss_target_models"]),
        ],
    ]  # fmt: skip


def secagg_section(results: dict) -> list[str]:
    """Docs lines: the secure-aggregation figures in full, with where the time goes."""
    runs = results["cases"].get("secagg")
    if not runs:
        return []
    m = results.get("machine_of", {}).get("secagg")
    lines = ["## Secure aggregation", ""]
    if m:
        lines += ["Measured in a run of its own (`python -m benchmarks.run --only secagg "
                  f"--into ...`): {m['cores']} cores ({m['cpu']}), {m['time']}, load average "
                  f"at start {m['load_avg']:.1f}.", ""]  # fmt: skip
    head = ["", *(f"{r['params'] / 1e6:.0f} M × {r['sites']} sites" for r in runs)]
    rows = [
        ("round time, plain / secure (s)",
         lambda r: f"{r['plain_round_s']:.2f} / {r['secure_round_s']:.2f}"),
        ("secure / plain (target ≤ 1.5)", lambda r: f"{r['time_ratio']:.2f}"),
        ("aggregator peak RSS, plain / secure (MB)",
         lambda r: f"{r['plain_peak_rss_MB']:.0f} / {r['secure_peak_rss_MB']:.0f}"),
        ("secure − plain (target ≤ 2 × model)",
         lambda r: f"{r['rss_extra_models']:+.2f} × {r['model_MB']:.0f} MB"),
        ("bytes up per site and round, plain",
         lambda r: f"{r['plain_upload_bytes_per_site_round']:,.0f}"),
        ("bytes up per site and round, secure: masked input + messages",
         lambda r: f"{r['secure_upload_bytes_per_site_round']:,.0f} + "
                   f"{r['secure_message_bytes_per_site_round']:,.0f}"),
        ("masking per site: CPU / wall (s)",
         lambda r: f"{r['mask_cpu_s']:.3f} / {r['mask_wall_s']:.2f}"),
    ]  # fmt: skip
    for step in runs[0]["secure_phases_s"]:
        rows.append((f"step `{step}`: secure (plain)", lambda r, k=step: _step(r, k)))
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, *(f(r) for r in runs)]) + " |" for label, f in rows]
    lines += ["", "Steps are the aggregator's own timings (the round log's `phases`, "
              "docs/round-log.md): a secure round's `training_s` is its ADVERTISE_KEYS phase "
              "(download, keys), a plain round's also holds the upload; `unmasking_s` is the "
              "server taking the masks off the sum."]  # fmt: skip
    return [*lines, ""]


def _step(r: dict, key: str) -> str:
    plain = r["plain_phases_s"].get(key)
    secure = r["secure_phases_s"].get(key, 0.0)
    return f"{secure:.3f}" + (f" ({plain:.3f})" if plain is not None else "")


def _round_row(label: str, r: dict) -> list[str]:
    rss_ok = r["peak_rss_MB"] <= r["rss_bound_MB"]
    time_ok = r.get("round_vs_ideal", 0) <= 2
    ideal = f", ideal {r['ideal_round_s']:.2f} s" if "ideal_round_s" in r else ""
    ratio = f"{r['round_vs_ideal']:.2f} × ideal" if "round_vs_ideal" in r else "-"
    return [
        label, f"{r['round_s']:.2f} s/round, RSS {r['peak_rss_MB']:.0f} MB",
        f"RSS bound {r['rss_bound_MB']:.0f} MB{ideal}", ratio, "≤ 2 × ideal, RSS ≤ bound",
        _met(rss_ok and time_ok) if "round_vs_ideal" in r else _met(rss_ok),
    ]  # fmt: skip


def table(rows: list[list[str]]) -> str:
    head = ["case", "fedmae", "baseline (same run)", "ratio", "target", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plots(results: dict, out: Path) -> list[Path]:
    c = results["cases"]
    made = []
    if c.get("rounds"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for params in sorted({r["params"] for r in c["rounds"]}):
            rs = [r for r in c["rounds"] if r["params"] == params]
            n = [r["clients"] for r in rs]
            a1.plot(n, [r["round_s"] for r in rs], marker="o", label=f"{params / 1e6:.0f} M")
            a2.plot(n, [r["peak_rss_MB"] for r in rs], marker="o", label=f"{params / 1e6:.0f} M")
            a2.plot(n, [r["rss_bound_MB"] for r in rs], ls=":", color=a2.lines[-1].get_color())
        a1.set(xlabel="clients", ylabel="seconds per round", title="Round time", xscale="log")
        a2.set(xlabel="clients", ylabel="MB", title="Aggregator peak RSS (dotted: bound)",
               xscale="log")  # fmt: skip
        a1.legend()
        a2.legend()
        made.append(_save(fig, out / "bench_rounds.png"))
    if c.get("secagg"):
        made.append(_secagg_plot(c["secagg"], out / "bench_secagg.png"))
    bars = {}
    if "kernel" in c:
        bars["aggregation"] = c["kernel"]["ratio"]
    if "transfer" in c:
        bars["SubmitUpdate"] = c["transfer"]["upload_ratio"]
        bars["FetchModel"] = c["transfer"]["fetch_ratio"]
    if "training" in c:
        bars["local training"] = 1 / (1 + c["training"]["overhead"])
    if bars:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh(list(bars), list(bars.values()))
        ax.axvline(0.8, color="k", ls=":", label="target 0.8")
        ax.set(xlabel="throughput / same-run baseline", title="fedmae vs its baselines")
        ax.legend()
        made.append(_save(fig, out / "bench_ratios.png"))
    return made


def _secagg_plot(runs: list[dict], path: Path) -> Path:
    """Plain and secure rounds side by side: time (dotted: 1.5 × plain) and the
    aggregator's peak RSS (dotted: plain + 2 × model)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['params'] / 1e6:.0f} M × {r['sites']}" for r in runs]
    x = range(len(runs))
    for ax, key, limit, unit in (
        (a1, "round_s", lambda r: r["time_target"] * r["plain_round_s"], "seconds per round"),
        (a2, "peak_rss_MB", lambda r: r["plain_peak_rss_MB"] + 2 * r["model_MB"], "MB"),
    ):
        ax.bar([i - 0.2 for i in x], [r[f"plain_{key}"] for r in runs], 0.4, label="plain")
        ax.bar([i + 0.2 for i in x], [r[f"secure_{key}"] for r in runs], 0.4, label="secure")
        for i, r in enumerate(runs):
            ax.hlines(limit(r), i - 0.4, i + 0.4, colors="k", linestyles=":")
        ax.set(xticks=list(x), xticklabels=labels, ylabel=unit)
        ax.legend()
    a1.set_title("Round time (dotted: target)")
    a2.set_title("Aggregator peak RSS (dotted: target)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render(results: dict, docs: Path, write: bool = True) -> str:
    m = results["machine"]
    machine_line = (
        f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}, "
        f"grpcio {m['grpcio']}, protobuf {m['protobuf']}, numpy {m['numpy']}; "
        f"load average at start {m['load_avg']:.1f}; {m['time']}"
    )
    text = f"Machine: {machine_line}\n\n" + table(summary_rows(results))
    if write:
        images = plots(results, docs)
        mode = "quick (`make bench-quick`)" if results["quick"] else "full (`make bench`)"
        body = [
            "# Benchmarks", "",
            f"Run: {mode}. Every figure is the median of several repetitions; every timing is "
            "set against a baseline measured in the same run, on the same data, and the ratio "
            "is what the targets judge (the machine is shared and noisy). Raw results: "
            "`benchmarks/results/`.", "",
            text, "",
        ]  # fmt: skip
        body += [f"![{p.stem}]({p.name})" for p in images]
        body += ["", *secagg_section(results), *robust_section(results)]
        notes = Path(__file__).with_name("NOTES.md")
        if notes.exists():
            body += ["", notes.read_text()]
        (docs / "BENCHMARKS.md").write_text("\n".join(body) + "\n")
    return text
