"""``docs/ML.md`` and its plots from the results of ``scripts/experiments.py``.

Every figure in the document is computed here from ``STATE/*/result.json``; the
sentences that read them are too, so a rerun cannot leave a stale claim behind.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from pathlib import Path

IID_TARGET = 1.05  # federated / centralized held-out loss, 3 sites IID
SKEW_TARGET = 1.10  # best strategy / centralized, 10 sites at alpha 0.3
PROBE_TOLERANCE = 0.02  # accuracy points: federated within 2 of centralized
PROBE_MARGIN = 0.02  # "clearly above random init": at least 2 points


def write_report(results: dict[str, dict], scale, out: Path) -> None:
    from scripts.experiments import ALPHAS, STRATEGIES

    out.parent.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, out.parent, ALPHAS, STRATEGIES)
    r = results
    lines: list[str] = []
    add = lines.append
    verdicts: list[str] = []

    def loss(name: str) -> float:
        return r[name]["final_eval"]

    def probe(name: str) -> float:
        """The run's probe accuracy; NaN (shown "n/a") where the probe has not run yet."""
        return r.get(f"probe-{name}", {}).get("test_accuracy", math.nan)

    eval_n = (
        "the whole 10k test split"
        if not scale.final_eval_images
        else (f"the first {scale.final_eval_images} test images (--quick)")
    )
    wall = sum(x.get("wall_s", 0) for x in r.values())
    add("# Federated MAE against centralized training\n")
    add(
        f"Written by `make experiments` (`scripts/experiments.py`) on "
        f"{dt.date.today().isoformat()}, {os.cpu_count()} cores ({platform.machine()}), "
        f"{wall / 60:.0f} min of runs in all. Every number below is read from the runs' "
        f"results (`experiments-state/*/result.json`); rerun to reproduce, and a step "
        f"that already has its result is kept.\n"
    )
    add("## How it is measured\n")
    add(
        "- **Model and data:** the `tiny` MAE (1.3 M parameters, 28×28, patch 4, mask "
        "ratio 0.75) on Fashion-MNIST (Debian's `dataset-fashion-mnist`). Every site "
        "keeps 10 % of its shard for validation, so 3 sites × 20k images train on 54k.\n"
        f"- **Training:** AdamW at lr {_lr(r)}, batch 64, weight decay 0.05, for the "
        "sites and for the centralized twin alike (`fedmae train-central`: one AdamW over "
        "the pooled training shards of the same sites, with the same data pipeline). A "
        "federated round is one local epoch; a simulated site starts each round with a "
        "fresh AdamW (docs/simulation.md), the twin keeps one for all passes.\n"
        f"- **Sites** are `fedmae simulate` sites: each enrolled, with its own shard and "
        "mTLS connection to a real aggregator on 127.0.0.1.\n"
        f"- **Exact evaluation:** each final model's masked-patch MSE on {eval_n} with "
        "fixed, seeded masks (`fedmae.ml.training.evaluate`, `EVAL_MASK_SEED`), the same "
        "function for federated and centralized models. The curves are each run's own "
        f"loss after every round (pass) on the first {_curve_n()} test images with the "
        "same masks.\n"
        "- **Equal passes:** a federated round with fraction F and one local epoch is F "
        "passes over the pooled data; the twin makes the same number of passes.\n"
        f"- **Linear probe** (`fedmae probe`, the MAE paper's protocol): frozen encoder, "
        f"class-token features, BatchNorm without affine and a linear layer fitted on "
        f"{scale.probe_images} training images, accuracy on {scale.probe_images} test "
        "images.\n"
        "- **Same start:** every run begins from the same initial model (seed 0); its "
        f"exact loss is {_same_start(r)}.\n"
    )

    # 1. IID: the verdict on the sites as deployed (fedmae client keeps its optimizer)
    iid = "fed-iid3-agents" if "fed-iid3-agents" in r else "fed-iid3"
    ratio = loss(iid) / loss("central-iid3")
    met = ratio <= IID_TARGET
    verdicts.append(
        f"| 3 sites IID within {IID_TARGET - 1:.0%} of centralized loss ({_label(iid)}) | "
        f"{ratio:.3f} | {'met' if met else 'missed'} |"
    )
    passes = r["central-iid3"]["settings"]["passes"]
    add(f"## 1. Three sites, IID, against the centralized twin ({passes} passes each)\n")
    add(
        "Two federated runs of the same 3 sites: `fedmae simulate` sites, which start every "
        "round with a fresh AdamW, and `fedmae client` processes (`fedmae demo`), which keep "
        "theirs from round to round as a deployed site does.\n"
    )
    add(f"![held-out loss by pass]({plots['iid']})\n")
    add("| run | exact held-out loss | ÷ centralized | probe accuracy | wall time | moved |")
    add("|---|---|---|---|---|---|")
    for name in ("central-iid3", "fed-iid3", "fed-iid3-agents"):
        if name in r:
            add(
                f"| {_label(name)} | {loss(name):.4f} | {loss(name) / loss('central-iid3'):.3f}"
                f" | {_acc(probe(name))} | {_mins(r[name])} | {_mb(r[name])} |"
            )
    c_set, f_set = r["central-iid3"]["settings"], r[iid]["settings"]
    add(
        f"\nOptimizer steps at equal passes: the twin takes {_steps(c_set['images'], passes)}"
        f" steps; each site takes {_steps(f_set['images_per_site'], f_set['rounds'])} on its "
        f"own third, averaged every {_steps(f_set['images_per_site'], 1)}."
    )
    add(
        f"\nTarget: federated within {IID_TARGET - 1:.0%} of centralized at equal passes: "
        f"**{'met' if met else 'missed'}** ({_label(iid)}: ratio {ratio:.3f}).\n"
    )

    # 2. tuning
    add("## 2. The server optimizers' knobs (10 sites, α = 0.3)\n")
    add(
        "Tuned on the α = 0.3 split with fewer rounds "
        f"({_setting(r, 'tune-', 'rounds')}), by exact held-out loss; the best value is "
        "used in section 3. FedProx keeps μ = "
        f"{_fedprox_mu()} (Li et al. 2020's grid starts there).\n"
    )
    add("| strategy | knob | exact held-out loss |")
    add("|---|---|---|")
    tuned = sorted(n for n in r if n.startswith("tune-"))
    for name in tuned:
        strategy, *knobs = name.split("-")[1:]
        best = min((n for n in tuned if n.split("-")[1] == strategy), key=loss) == name
        value = f"**{loss(name):.4f}** (used)" if best else f"{loss(name):.4f}"
        add(f"| {strategy} | {', '.join(_knob(k) for k in knobs)} | {value} |")
    add("")

    # 3. label skew
    grid_rounds = r["central-a0.3"]["settings"]["passes"]
    add(f"## 3. Ten sites with label skew ({grid_rounds} rounds = {grid_rounds} passes)\n")
    add(
        f"Each site holds a Dirichlet(α) share of {_setting(r, 'fed-a', 'images_per_site')}"
        " images a site; smaller α, more skew. Every site trains every round.\n"
    )
    add(f"![held-out loss by round, per alpha]({plots['skew']})\n")
    add("| α | centralized | " + " | ".join(STRATEGIES) + " | best ÷ centralized |")
    add("|---|---|" + "---|" * len(STRATEGIES) + "---|")
    for alpha in ALPHAS:
        c = loss(f"central-a{alpha:g}")
        fed = {s: loss(f"fed-a{alpha:g}-{s}") for s in STRATEGIES}
        best = min(fed, key=fed.__getitem__)
        cells = " | ".join(
            f"**{fed[s]:.4f}**" if s == best else f"{fed[s]:.4f}" for s in STRATEGIES
        )
        add(f"| {alpha:g} | {c:.4f} | {cells} | {fed[best] / c:.3f} ({best}) |")
        if alpha == 0.3:
            skew_ratio, skew_best = fed[best] / c, best
    g = r["central-a0.3"]["settings"]
    add(
        f"\nOptimizer steps: the twin takes {_steps(g['images'], g['passes'])}; a site of "
        f"{g['images'] // 10} images takes {_steps(g['images'] // 10, g['passes'])}, "
        f"{_steps(g['images'] // 10, 1)} between averages (fewer or more with skewed shard "
        "sizes)."
    )
    met = skew_ratio <= SKEW_TARGET
    verdicts.append(
        f"| 10 sites α = 0.3 within {SKEW_TARGET - 1:.0%} (best strategy, {skew_best}) | "
        f"{skew_ratio:.3f} | {'met' if met else 'missed'} |"
    )
    add(
        f"\nTarget: at α = 0.3 the best strategy within {SKEW_TARGET - 1:.0%} of "
        f"centralized: **{'met' if met else 'missed'}** ({skew_best}, ratio "
        f"{skew_ratio:.3f}).\n"
    )

    # 4. many sites
    many = r["fed-many"]["settings"]
    many_passes = many["rounds"] * many["fraction"]
    add(
        f"## 4. {many['sites']} sites, {many['fraction']:.0%} per round "
        f"({many['rounds']} rounds = {many_passes:g} passes)\n"
    )
    ref = r["central-iid3"].get("by_pass", {}).get(str(round(many_passes)))
    if float(many_passes).is_integer() and many_passes == passes:
        ref = loss("central-iid3")
    add(
        f"{many['sites']} sites of {many['images_per_site']} images (IID) make the 60k "
        f"training split; {round(many['sites'] * many['fraction'])} are sampled each "
        "round.\n"
    )
    add("| run | exact held-out loss | ÷ centralized at equal passes | probe | wall | moved |")
    add("|---|---|---|---|---|---|")
    vs = f"{loss('fed-many') / ref:.3f}" if ref else "n/a"
    add(
        f"| FedAvg, {many['sites']} sites | {loss('fed-many'):.4f} | {vs} | "
        f"{_acc(probe('fed-many'))} | {_mins(r['fed-many'])} | {_mb(r['fed-many'])} |"
    )
    if ref:
        add(
            f"\nThe centralized reference is the section-1 twin after {many_passes:g} "
            f"passes ({ref:.4f}): the same 60k images, pooled over 3 sites' shards "
            "instead of 100 (the held-out 10 % differs).\n"
        )
    else:
        add("")

    # 5. probes
    add("## 5. Linear probes of the encoders\n")
    add(f"![probe accuracy]({plots['probe']})\n")
    add("| encoder | probe accuracy | ÷ random init (points) |")
    add("|---|---|---|")
    random_acc = r["probe-random"]["test_accuracy"]
    add(f"| random init (seed 0) | {random_acc:.4f} | 0 |")
    for name in _probed(r):
        acc = probe(name)
        add(f"| {_label(name)} | {acc:.4f} | {100 * (acc - random_acc):+.1f} |")
    unprobed = [n for n in r if n.startswith(("fed-", "central-")) and f"probe-{n}" not in r]
    if unprobed:
        add(f"\nNot probed yet (the run's probe step has not run): {', '.join(unprobed)}.")
    gap = probe("central-iid3") - probe(iid)
    above = probe(iid) - random_acc
    met = abs(gap) <= PROBE_TOLERANCE and above >= PROBE_MARGIN
    if math.isnan(gap + above):
        met = None  # a probe it needs has not run
    verdicts.append(
        f"| probe: federated within {100 * PROBE_TOLERANCE:.0f} points of centralized, "
        f"≥ {100 * PROBE_MARGIN:.0f} above random | {100 * gap:+.1f} / "
        f"{100 * above:+.1f} points | {_verdict(met)} |"
    )
    add(
        f"\nTarget: the federated encoder ({_label(iid)}) within {100 * PROBE_TOLERANCE:.0f} "
        f"points of the centralized one and clearly (≥ {100 * PROBE_MARGIN:.0f} points) "
        f"above random init: **{_verdict(met)}** (centralized − federated "
        f"{100 * gap:+.1f} points; federated − random {100 * above:+.1f} points).\n"
    )

    # wall time and bytes
    add("## Wall time and bytes moved\n")
    add(
        "Wall time of each run on this shared machine (2 cores: the sites and the "
        "aggregator share them, so a federated run is slower than one process training "
        "on both cores), and model bytes sent plus update bytes received by the "
        "aggregator.\n"
    )
    add("| run | wall time | moved | rounds (passes) |")
    add("|---|---|---|---|")
    for name in [n for n in r if r[n]["settings"]["kind"] in ("fed", "central")]:
        st = r[name]["settings"]
        steps = st.get("rounds", st.get("passes"))
        add(f"| {name} | {_mins(r[name])} | {_mb(r[name])} | {steps} |")
    add("\n## Targets\n")
    add("| target | measured | |")
    add("|---|---|---|")
    lines.extend(verdicts)
    add("")
    out.write_text("\n".join(lines))


def _plots(results: dict, folder: Path, alphas, strategies) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("central-iid3", "fed-iid3", "fed-iid3-agents", "fed-many"):
        if name in results:
            label = _label(name)
            xs, ys = zip(*results[name]["curve"], strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="passes over the pooled training data", ylabel="held-out loss (2k images)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    names["iid"] = save_plot(fig, folder, "ml_iid.png")

    fig, axes = plt.subplots(1, len(alphas), figsize=(4 * len(alphas), 3.6), sharey=True)
    for ax, alpha in zip(axes, alphas, strict=True):
        central = results.get(f"central-a{alpha:g}")
        if central:
            xs, ys = zip(*central["curve"][1:], strict=True)
            ax.plot(xs, ys, "k--", label="centralized")
        for s in strategies:
            run = results.get(f"fed-a{alpha:g}-{s}")
            if run:
                xs, ys = zip(*run["curve"], strict=True)
                ax.plot(xs, ys, marker=".", label=s)
        ax.set(title=f"α = {alpha:g}", xlabel="round (= pass)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (2k images)")
    axes[-1].legend(fontsize=8)
    names["skew"] = save_plot(fig, folder, "ml_dirichlet.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    probed = _probed(results)
    accs = [results[f"probe-{n}"]["test_accuracy"] for n in probed]
    ax.barh([_label(n) for n in probed], accs, color="tab:blue")
    if "probe-random" in results:
        ax.axvline(results["probe-random"]["test_accuracy"], color="k", ls="--",
                   label="random init")  # fmt: skip
        ax.legend(loc="lower right")
    ax.set(xlabel="linear-probe test accuracy", xlim=(min(accs + [0.7]) - 0.02, 1))
    ax.invert_yaxis()
    names["probe"] = save_plot(fig, folder, "ml_probe.png")
    return names


def save_plot(fig, folder: Path, name: str) -> str:
    """Write ``fig`` as ``folder/name`` (shared with scripts/privacy_report.py)."""
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110, bbox_inches="tight")  # a legend outside the axes too
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _probed(results: dict) -> list[str]:
    return [n.removeprefix("probe-") for n in results if n.startswith("probe-") and
            n != "probe-random"]  # fmt: skip


def _label(name: str) -> str:
    if name == "central-iid3":
        return "centralized, the 3 sites' pooled 54k"
    if name == "fed-iid3":
        return "FedAvg, 3 simulated sites IID (fresh AdamW each round)"
    if name == "fed-iid3-agents":
        return "FedAvg, 3 fedmae client processes IID (AdamW kept)"
    if name == "fed-many":
        return "FedAvg, many sites, 10 %"
    if name.startswith("central-a"):
        return f"centralized, α = {name.removeprefix('central-a')} pool"
    _, alpha, strategy = name.split("-")
    return f"{strategy}, α = {alpha.removeprefix('a')}"


def _steps(images: int, passes: int, batch: int = 64) -> int:
    """AdamW steps of ``passes`` epochs over ``images`` (90 % of them train, batch 64)."""
    return passes * -(-int(images * 0.9) // batch)


def _acc(accuracy: float) -> str:
    return "n/a" if math.isnan(accuracy) else f"{accuracy:.4f}"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "missed"


def _knob(text: str) -> str:
    for prefix, symbol in (("eta", "η"), ("beta", "β")):
        if text.startswith(prefix):
            return f"{symbol} = {text.removeprefix(prefix)}"
    return text


def _mins(result: dict) -> str:
    return f"{result['wall_s'] / 60:.1f} min"


def _mb(result: dict) -> str:
    total = result.get("bytes_in", 0) + result.get("bytes_out", 0)
    return f"{total / 1e6:,.0f} MB" if total else "-"


def _lr(results: dict) -> str:
    return f"{next(iter(results.values()))['settings'].get('lr', '?'):g}"


def _curve_n() -> str:
    from scripts.experiments import CURVE_IMAGES

    return f"{CURVE_IMAGES:,}"


def _fedprox_mu() -> str:
    from scripts.experiments import FEDPROX_MU

    return f"{FEDPROX_MU:g}"


def _setting(results: dict, prefix: str, key: str):
    values = {r["settings"].get(key) for n, r in results.items() if n.startswith(prefix)}
    return ", ".join(str(v) for v in sorted(values))


def _same_start(results: dict) -> str:
    starts = sorted({round(r["initial_eval"], 6) for r in results.values() if "initial_eval" in r})
    if len(starts) == 1:
        return f"{starts[0]:.4f} in every run (federated and centralized)"
    return f"NOT the same in every run: {', '.join(f'{s:.4f}' for s in starts)}"
