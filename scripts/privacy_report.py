"""``docs/PRIVACY.md`` and its plots from the results of ``scripts/privacy_eval.py``.

Every figure in the document is computed here from ``STATE/*/result.json``, and so is
every verdict: a rerun cannot leave a stale claim behind. A run that is missing is
shown as missing, never filled in.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

from scripts.ml_report import save_plot

UTILITY_TARGET = 1.15  # ε = 8 loss / no-DP loss
MEMBERSHIP_TARGET = 0.55  # ROC AUC of the loss-threshold attack under DP
POISON_TARGET = 1.05  # best robust rule's loss / the clean run's, for every attack


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def write_report(results: dict[str, dict], scale, out: Path) -> None:
    from scripts.privacy_eval import (
        CLEAN_REPLICA_SEEDS,
        DELTA,
        EPSILONS,
        MEMBERSHIP_EPSILON,
        POPULATIONS,
        clean_replica_name,
        overfit_name,
        poison_name,
        population_name,
        utility_name,
    )

    r = results
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = _plots(r, scale, out.parent)
    lines: list[str] = []
    add = lines.append
    verdicts: list[str] = []
    eval_n = (
        "the whole 10k test split"
        if not scale.final_eval_images
        else f"the first {scale.final_eval_images} test images (--quick)"
    )
    wall = sum(x.get("wall_s", 0) for x in r.values())
    add("# Privacy and robustness, measured\n")
    add(
        f"Written by `make privacy-eval` (`scripts/privacy_eval.py`) on "
        f"{dt.date.today().isoformat()}, {os.cpu_count()} cores ({platform.machine()}), "
        f"{wall / 60:.0f} min of runs in all. Every number below is read from the runs' "
        "results (`privacy-state/*/result.json`); rerun to reproduce (a step that already "
        "has its result is kept). Mechanisms and their limits: docs/privacy.md.\n"
    )
    add("## How it is measured\n")
    add(
        "- **Sites** are `fedmae simulate` sites (docs/simulation.md): each enrolled, with "
        "its own shard and mTLS connection to a real `fedmae serve` on 127.0.0.1; the tiny "
        "MAE on Fashion-MNIST, one local epoch a round, a fresh AdamW each round.\n"
        f"- **Loss:** each final model's masked-patch MSE on {eval_n} with fixed, seeded "
        "masks (`fedmae.ml.training.evaluate`, `EVAL_MASK_SEED`).\n"
        f"- **DP:** σ calibrated by the server for the planned rounds so that ε <= the "
        f"target at δ = {DELTA:g}, clip C = 5 (the default `--dp-clip`); ε is the "
        "server's ledger after the last round. `--dp central`: Gaussian noise added by "
        "the server, RDP accountant with Poisson sampling at q = `--fraction`. `--dp "
        "distributed` (with `--secure-aggregation`): Skellam shares added by the sites "
        "before masking, the Skellam RDP bound without amplification by sampling.\n"
    )

    # 1. utility
    nodp = r.get(utility_name(None))
    st = (nodp or next(iter(r.values()), {})).get("settings", {})
    add(
        f"## 1. Utility: {st.get('sites', '?')} sites, {st.get('fraction', 0):.0%} per "
        f"round, {st.get('rounds', '?')} rounds\n"
    )
    if "utility" in plots:
        add(f"![held-out loss by round]({plots['utility']})\n")
    add(
        "| run | σ | ε at δ (ledger) | noise norm on the mean (signal <= C) | exact held-out "
        "loss | ÷ no DP | wall |"
    )
    add("|---|---|---|---|---|---|---|")
    base = nodp["final_eval"] if nodp else None
    rows = [("no DP", r.get(utility_name(None)), False)]
    rows += [(f"central DP, target ε = {e:g}", r.get(utility_name(e)), False) for e in EPSILONS]
    rows += [(f"distributed DP (Skellam + secure aggregation), target ε = {e:g}",
              r.get(utility_name(e, "distributed")), False) for e in EPSILONS]  # fmt: skip
    rows += [(f"ε = 8's noise as N = {n:,} sites would add it (emulated)",
              r.get(population_name(n)), True) for n in POPULATIONS]  # fmt: skip
    for label, run, emulated in rows:
        add(_utility_row(label, run, base, emulated))
    utility_verdicts = []
    for mode in ("central", "distributed"):
        target = r.get(utility_name(8.0, mode))
        if base and target:
            ratio = target["final_eval"] / base
            met = ratio <= UTILITY_TARGET
            measured = _num(ratio, 3)
        else:
            met, measured = False, "not run"
        utility_verdicts.append((mode, met, measured))
        verdicts.append(
            f"| ε = 8 within {UTILITY_TARGET - 1:.0%} of the no-DP loss ({mode}) | "
            f"{measured} | {_verdict(met)} |"
        )
    add(
        "\nThe noise column is the expected L2 norm of the noise on a round's mean delta, "
        "σ·C·√P / (q·N) for P = the model's "
        f"{_model_size():,} parameters, beside the mean of clipped deltas, whose norm is at "
        "most C: the signal-to-noise of one DP round.\n"
    )
    add(
        "The *emulated* rows answer what population ε = 8 needs here: the noise on a "
        "round's mean is σ·C/(q·N), so a run of these sites with σ scaled by "
        "sites / N gives the model the noise N sites at ε = 8 would give it (their "
        "sampled mean would also average more sites). Those runs' own ε is far above 8: "
        "they measure utility, they guarantee nothing.\n"
    )
    emulated = [(n, r[population_name(n)]["final_eval"] / base) for n in POPULATIONS
                if base and population_name(n) in r]  # fmt: skip
    if emulated:
        enough = [n for n, ratio in emulated if ratio <= UTILITY_TARGET]
        add(
            f"Why the DP rows miss by so much here: with q·N = "
            f"{st.get('sites', 0) * st.get('fraction', 0):g} sites a round, the noise on "
            "the mean is hundreds of times the signal (the noise column against C); the "
            "model is lost in the first rounds and never recovers. Noise shrinks as 1/N at "
            "the same ε: "
            + (
                f"from N = {min(enough):,} sites on, ε = 8's noise comes within "
                f"{UTILITY_TARGET - 1:.0%} of the no-DP loss here (emulated rows). "
                if enough
                else f"no emulated population up to N = {max(POPULATIONS):,} comes within "
                f"{UTILITY_TARGET - 1:.0%} of the no-DP loss. "
            )
            + "This is the known shape of DP-FedAvg (McMahan et al. 2018 train with about "
            "5,000 users a round): it needs populations, not 100 sites.\n"
        )
    add(
        "Distributed mode's σ is larger for the same ε: its ledger claims no "
        "amplification by sampling (the server that samples is the party it does not "
        "trust), and the noise is Skellam in 2^frac_bits units (docs/privacy.md).\n"
    )
    add(
        f"Target: ε = 8 within {UTILITY_TARGET - 1:.0%} of the no-DP loss: "
        + "; ".join(
            f"{mode} **{_verdict(met)}** (ratio {measured})"
            for mode, met, measured in utility_verdicts
        )  # fmt: skip
        + ".\n"
    )

    # 2. membership inference
    add("## 2. Membership inference (loss threshold, Yeom et al. 2018)\n")
    add(
        "The attacker holds the final global model and guesses *member* when an image's "
        "masked-reconstruction loss (the fixed masks above) is below a threshold. Members: "
        "the training images of the site that took part in the most rounds; non-members: "
        "as many test images (seeded sample). AUC 0.5 is a coin flip (± its spread under "
        "the null, √((m+n+1)/(12mn)), for m members and n others); the advantage is max "
        "over thresholds of TPR − FPR.\n"
    )
    if "roc" in plots:
        add(f"![ROC of the attack]({plots['roc']})\n")
    add(
        "| model | site (rounds in / of) | members | mean loss members / others | AUC (± null) "
        "| advantage |"
    )
    add("|---|---|---|---|---|---|")
    controls = [(overfit_name(e), f"control (memorising): {_dp_label(e)}")
                for e in (None, MEMBERSHIP_EPSILON)]  # fmt: skip
    for key, label in [
        (utility_name(e), _dp_label(e)) for e in (None, MEMBERSHIP_EPSILON)
    ] + controls:
        m = r.get(f"membership-{key}")
        if m is None:
            add(f"| {label} | | | | not run | |")
            continue
        add(
            f"| {label} | {m['site']} ({m['rounds_in']} / {m['rounds']}) | {m['members']} | "
            f"{m['member_loss']:.4f} / {m['nonmember_loss']:.4f} | {m['auc']:.3f} "
            f"(± {_null_sd(m['members'], m['nonmembers']):.3f}) | "
            f"{m['advantage']:.3f} |"
        )
    dp_m = r.get(f"membership-{utility_name(MEMBERSHIP_EPSILON)}")
    met = bool(dp_m) and dp_m["auc"] <= MEMBERSHIP_TARGET
    measured = f"{dp_m['auc']:.3f}" if dp_m else "not run"
    verdicts.append(
        f"| membership AUC <= {MEMBERSHIP_TARGET} with DP (ε = {MEMBERSHIP_EPSILON:g}) | "
        f"{measured} | {_verdict(met)} |"
    )
    add(_membership_reading(r.get(f"membership-{utility_name(None)}"),
                            r.get(f"membership-{overfit_name(None)}")))  # fmt: skip
    add(
        f"\nTarget: AUC <= {MEMBERSHIP_TARGET} with DP: **{_verdict(met)}** (AUC {measured})."
        " One attack, not a bound: an attacker choosing masks, or with a reference model, "
        "can do better; DP bounds them all (docs/privacy.md).\n"
    )

    # 3. poisoning
    clean = r.get(poison_name(None))
    pst = (clean or {}).get("settings", {})
    add(
        f"## 3. Poisoning: {pst.get('sites', '?')} sites, one malicious, "
        f"{pst.get('rounds', '?')} rounds\n"
    )
    add(
        "site-1 trains honestly, then sends (`fedmae simulate --malicious 1 --attack A`): "
        "`scale` 100 × its delta, `signflip` −delta, `noise` Gaussian noise of its delta's "
        "norm, `claim` its honest delta with n = 2^40. Every site is in every round. The "
        "server's own norm bound is off (`--max-update-norm off`), so FedAvg is undefended "
        "and each rule stands alone. Each cell is the final exact held-out loss.\n"
    )
    if "poison" in plots:
        add(f"![final loss per attack and rule]({plots['poison']})\n")
    clean_loss = clean["final_eval"] if clean else None
    add(f"Clean FedAvg run: {f'{clean_loss:.4f}' if clean_loss else 'not run'}.\n")
    replicas = [r[n]["final_eval"] for n in map(clean_replica_name, CLEAN_REPLICA_SEEDS) if n in r]
    if clean_loss and replicas:
        spread = [clean_loss, *replicas]
        add(
            f"The same clean run with {len(replicas)} other seed(s) (`--seed`): "
            + ", ".join(f"{x:.4f}" for x in replicas)
            + f"; all {len(spread)} span {min(spread):.4f}-{max(spread):.4f} "
            f"(±{(max(spread) - min(spread)) / 2 / clean_loss:.0%} of the clean loss). After "
            f"{pst.get('rounds', '?')} rounds one run's loss varies this much by chance "
            "alone, so a ratio within that band is no evidence either way.\n"
        )
    robust = [x for x in scale.rules if x != "fedavg"]
    add("| attack | " + " | ".join(scale.rules) + " | best robust ÷ clean |")
    add("|---|" + "---|" * len(scale.rules) + "---|")
    all_met = bool(clean_loss) and bool(scale.attacks)
    worst = None
    clean_cells = [r.get(poison_name(None, rule)) for rule in scale.rules]
    if any(clean_cells):
        add(
            "| none (clean) | "
            + " | ".join(_num(c["final_eval"]) if c else "not run" for c in clean_cells)
            + " | - |"
        )
    for attack in scale.attacks:
        cells, losses = [], {}
        for rule in scale.rules:
            run = r.get(poison_name(attack, rule))
            cells.append(_num(run["final_eval"]) if run else "not run")
            if run and rule in robust:
                losses[rule] = run["final_eval"]
        if clean_loss and losses:
            best = min(losses, key=losses.__getitem__)
            ratio = losses[best] / clean_loss
            all_met &= ratio <= POISON_TARGET
            worst = ratio if worst is None else max(worst, ratio)
            tail = f"{ratio:.3f} ({best})"
        else:
            all_met, tail = False, "not run"
        add(f"| {attack} | " + " | ".join(cells) + f" | {tail} |")
    measured = f"worst {worst:.3f}" if worst is not None else "not run"
    verdicts.append(
        f"| best robust rule within {POISON_TARGET - 1:.0%} of the clean run, every attack | "
        f"{measured} | {_verdict(all_met)} |"
    )
    add(
        f"\nTarget: for every attack the best robust rule within {POISON_TARGET - 1:.0%} of "
        f"the clean run: **{_verdict(all_met)}** ({measured}).\n"
    )
    add("## Targets\n")
    add("| target | measured | |")
    add("|---|---|---|")
    lines.extend(verdicts)
    add("")
    out.write_text("\n".join(lines))


def _plots(r: dict, scale, folder: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fedmae.privacy.membership import roc_curve
    from scripts import privacy_eval as pe

    names: dict[str, str] = {}
    runs = [("no DP", "-", r.get(pe.utility_name(None)))]
    runs += [(f"central ε = {e:g}", "-", r.get(pe.utility_name(e))) for e in pe.EPSILONS]
    runs += [(f"distributed ε = {e:g}", "--", r.get(pe.utility_name(e, "distributed")))
             for e in pe.EPSILONS]  # fmt: skip
    runs += [(f"ε = 8 as N = {n:,} (emulated)", ":", r.get(pe.population_name(n)))
             for n in pe.POPULATIONS]  # fmt: skip
    if any(run for _, _, run in runs):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, style, run in runs:
            if run and run.get("curve"):
                xs, ys = zip(*run["curve"], strict=True)
                ax.plot(xs, ys, style, marker=".", label=label)
        ax.set(xlabel="passes over the pooled data", ylabel="held-out loss (2k images)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
        names["utility"] = save_plot(fig, folder, "privacy_utility.png")
    members = [
        (f"{what}{_dp_label(e)}", style, r.get(f"membership-{name(e)}"))
        for what, style, name in (("", "-", pe.utility_name), ("control, ", "--", pe.overfit_name))
        for e in (None, pe.MEMBERSHIP_EPSILON)
    ]
    if any(m for _, _, m in members):
        fig, ax = plt.subplots(figsize=(5, 5))
        for label, style, m in members:
            if m:
                _, tpr, fpr = roc_curve(m["member_losses"], m["nonmember_losses"])
                ax.plot(fpr, tpr, style, label=f"{label} (AUC {m['auc']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(loc="lower right")
        names["roc"] = save_plot(fig, folder, "privacy_membership_roc.png")
    if any(r.get(pe.poison_name(a, x)) for a in scale.attacks for x in scale.rules):
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(scale.rules)
        for k, rule in enumerate(scale.rules):
            ys = [
                r.get(pe.poison_name(a, rule), {}).get("final_eval", np.nan) for a in scale.attacks
            ]
            xs = np.arange(len(scale.attacks)) + k * width
            ax.bar(xs, ys, width, label=rule)
        if r.get(pe.poison_name(None)):
            ax.axhline(r[pe.poison_name(None)]["final_eval"], color="k", ls="--", label="clean")
        ax.set_xticks(np.arange(len(scale.attacks)) + 0.4 - width / 2, scale.attacks)
        ax.set(ylabel="final held-out loss")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        names["poison"] = save_plot(fig, folder, "privacy_poisoning.png")
    return names


def _null_sd(m: int, n: int) -> float:
    """The AUC's standard deviation when members and others are alike (Mann-Whitney)."""
    return ((m + n + 1) / (12 * m * n)) ** 0.5


def _model_size() -> int:
    from fedmae.ml.model_state import trainable_state
    from fedmae.ml.model_zoo import build_model
    from fedmae.payload.layout import ModelLayout

    return ModelLayout.from_state(trainable_state(build_model("tiny", seed=0))).numel


def _at_chance(m: dict) -> bool:
    """Whether an attack's AUC is within 2 null spreads of 0.5 (no evidence of a gap)."""
    return abs(m["auc"] - 0.5) <= 2 * _null_sd(m["members"], m["nonmembers"])


def _membership_reading(base: dict | None, control: dict | None) -> str:
    """What the no-DP rows say about the DP rows, computed from their AUCs."""
    if base is None or not _at_chance(base):
        return ""
    text = (
        f"\nWithout DP the attack is already at chance on the utility run (AUC "
        f"{base['auc']:.3f}, within 2 null spreads of 0.5): a site's images seen "
        f"{base['rounds_in']} times, one local epoch each, leave no loss gap to find, so "
        "the DP row there shows nothing DP did."
    )
    if control is None:
        return text + " The control rows are not run yet.\n"
    gap = control["nonmember_loss"] - control["member_loss"]
    if _at_chance(control):
        return text + (
            f" Even the control, which sees each image hundreds of times, leaves the "
            f"attack near chance (AUC {control['auc']:.3f}; members' mean loss only "
            f"{gap:.4f} below the others'): this MAE, trained on random masks, does not "
            "memorise single images in a way its loss shows at this size, so neither "
            "pair of rows shows what DP protects against. A stronger attacker (shadow or "
            "reference models, LiRA; per-mask losses) is the next measurement.\n"
        )
    return text + (
        f" The control shows the attack works where there is a gap (AUC "
        f"{control['auc']:.3f} without DP); its DP row is what DP did about it.\n"
    )


def _dp_label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"central DP, ε = {epsilon:g}"


def _utility_row(label: str, run: dict | None, base: float | None, emulated: bool) -> str:
    """One row of the utility table; an emulated run's ε is its own, far above 8."""
    if run is None:
        return f"| {label} | | | | not run | | |"
    dp = run.get("dp") or {}
    ratio = _num(run["final_eval"] / base, 3) if base else "-"
    if not dp:
        return f"| {label} | - | none | - | {_num(run['final_eval'])} | {ratio} | {_mins(run)} |"
    sigma = f"{dp['noise_multiplier']:.4g}" if emulated else f"{dp['noise_multiplier']:.3f}"
    eps = f"{dp['epsilon']:.3g} (this run's own)" if emulated else f"{dp['epsilon']:.3f}"
    noise = f"{_noise_norm(dp):.{2 if emulated else 1}f} (C = {dp['clip']:g})"
    loss = _num(run["final_eval"])
    return f"| {label} | {sigma} | {eps} | {noise} | {loss} | {ratio} | {_mins(run)} |"


def _num(value: float, places: int = 4) -> str:
    """A loss or ratio: fixed places while small, 4 significant digits once it has
    blown up (a diverged run's 4.448e+09 is not 4448389924.4544)."""
    return f"{value:.{places}f}" if abs(value) < 1000 else f"{value:.4g}"


def _noise_norm(dp: dict) -> float:
    """E‖noise on the mean‖ ≈ std·√P / (q·N) (the noised sum divided by q·N), std = σ·C
    (central) or the Skellam noise's σ·Δ₂/s (distributed: at its fewest sites)."""
    std = dp.get("noise_std") or dp["noise_multiplier"] * dp["clip"]
    return std * _model_size() ** 0.5 / (dp["q"] * dp["population"])


def _mins(result: dict) -> str:
    return f"{result.get('wall_s', 0) / 60:.1f} min"
