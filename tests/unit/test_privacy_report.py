"""docs/PRIVACY.md is computed from the privacy evaluation's results: each verdict
follows its figures (met on one side of each target, missed on the other), a run
that did not happen is shown as not run, and the plots are written."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.privacy_eval import ATTACKS, EPSILONS, RULES, Scale, poison_name, utility_name
from scripts.privacy_report import write_report

FULL = Scale()


def _fed(final: float, epsilon: float | None = None, distributed: bool = False, **settings):
    dp = None
    if epsilon is not None:
        dp = {"epsilon": epsilon * 0.999, "noise_multiplier": 1.1, "clip": 5.0, "q": 0.1}
        dp["population"] = 100
        if distributed:  # σ larger (no amplification), std a hair over σC (rounding)
            dp |= {"noise_multiplier": 4.4, "noise_std": 4.4 * 5 * 1.0002, "mode": "distributed"}
    return {
        "settings": {"kind": "fed", "sites": 100, "fraction": 0.1, "rounds": 20, **settings},
        "wall_s": 60.0,
        "final_eval": final,
        "curve": [(0.1, final * 1.3), (0.2, final)],
        "dp": dp,
    }


def _membership(auc: float) -> dict:
    rng = np.random.default_rng(0)
    return {
        "settings": {"kind": "membership"}, "site": "site-007", "rounds_in": 4, "rounds": 20,
        "auc": auc, "advantage": 0.1, "threshold": 0.5, "members": 540, "nonmembers": 540,
        "member_loss": 0.40, "nonmember_loss": 0.41,
        "member_losses": rng.normal(0.40, 0.1, 540).tolist(),
        "nonmember_losses": rng.normal(0.41, 0.1, 540).tolist(),
    }  # fmt: skip


def _results(eps8: float, dp_auc: float, best_robust: float) -> dict[str, dict]:
    r = {utility_name(None): _fed(0.40)}
    for eps in EPSILONS:
        r[utility_name(eps)] = _fed(eps8 if eps == 8 else 0.9, eps)
        r[utility_name(eps, "distributed")] = _fed(eps8 if eps == 8 else 1.9, eps, True)
    r[f"membership-{utility_name(None)}"] = _membership(0.58)
    r[f"membership-{utility_name(8.0)}"] = _membership(dp_auc)
    r[poison_name(None)] = _fed(0.50, sites=5, rounds=5)
    for attack in ATTACKS:
        for k, rule in enumerate(RULES):
            loss = 5.0 if rule == "fedavg" else (best_robust if k == 1 else 0.70)
            r[poison_name(attack, rule)] = _fed(loss, sites=5, rounds=5)
    return r


def _targets(text: str) -> list[str]:
    table = text.split("## Targets")[1].strip().splitlines()[2:]
    return [row.rsplit("|", 2)[1].strip() for row in table]


@pytest.mark.parametrize(
    ("eps8", "dp_auc", "best_robust", "verdicts"),
    [
        (0.458, 0.549, 0.524, ["met", "met", "met", "met"]),  # 1.145, AUC 0.549, 1.048
        (0.462, 0.551, 0.526, ["missed", "missed", "missed", "missed"]),  # 1.155, .551, 1.052
        (0.40, 0.50, 0.60, ["met", "met", "met", "missed"]),
    ],
)
def test_each_target_is_met_or_missed_as_its_figures_say(
    tmp_path, eps8, dp_auc, best_robust, verdicts
):
    out = tmp_path / "PRIVACY.md"
    write_report(_results(eps8, dp_auc, best_robust), FULL, out)
    text = out.read_text()
    assert _targets(text) == verdicts
    assert f"| {eps8 / 0.40:.3f} |" in text  # the ratio to no DP, in the utility table
    assert f"{best_robust / 0.50:.3f} (median)" in text  # the best rule is named
    assert f"| {dp_auc:.3f} (± 0.018) |" in text  # 540 vs 540 under the null
    assert "7.992" in text  # ε from the ledger (the run's own, not the target)
    assert f"| {1.1 * 5 * 1_301_648**0.5 / 10:.1f} (C = 5) |" in text  # σC√P/(qN)
    std = 4.4 * 5 * 1.0002  # distributed: the Skellam noise's own std, not σC
    assert f"| 4.400 | 7.992 | {std * 1_301_648**0.5 / 10:.1f} (C = 5) | {eps8:.4f} |" in text
    for plot in ("privacy_utility.png", "privacy_membership_roc.png", "privacy_poisoning.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_a_missing_run_is_shown_as_not_run_and_its_target_missed(tmp_path):
    results = _results(0.41, 0.50, 0.51)
    del results[utility_name(8.0)], results[f"membership-{utility_name(8.0)}"]
    del results[poison_name("noise", "median")]  # the other robust rules still count
    del results[poison_name("claim", "median")], results[poison_name("claim", "trimmed-mean")]
    del results[poison_name("claim", "multi-krum")], results[poison_name("claim", "norm-bounded")]
    write_report(results, FULL, tmp_path / "PRIVACY.md")
    text = (tmp_path / "PRIVACY.md").read_text()
    # Central ε = 8 did not run (missed); distributed did (0.41 / 0.40: met).
    assert _targets(text) == ["missed", "met", "missed", "missed"]
    assert "| central DP, target ε = 8 | | | | not run | | |" in text
    assert "| control (memorising): central DP, ε = 8 | | | | not run | |" in text
    assert "| claim | 5.0000 | not run | not run | not run | not run | not run |" in text
    assert f"{0.70 / 0.50:.3f} (trimmed-mean)" in text  # noise: median missing, next best


@pytest.mark.parametrize(
    ("control_auc", "reading"),
    [(0.52, "Even the control"), (0.70, "The control shows the attack works"), (None, "not run")],
)
def test_what_the_no_dp_rows_say_is_computed_from_their_aucs(tmp_path, control_auc, reading):
    from scripts.privacy_eval import overfit_name

    results = _results(0.41, 0.50, 0.51)
    results[f"membership-{utility_name(None)}"] = _membership(0.51)  # at chance (± 0.018)
    if control_auc is not None:
        results[f"membership-{overfit_name(None)}"] = _membership(control_auc)
    write_report(results, FULL, tmp_path / "PRIVACY.md")
    text = (tmp_path / "PRIVACY.md").read_text()
    assert "Without DP the attack is already at chance on the utility run (AUC 0.510" in text
    assert reading in text
    results[f"membership-{utility_name(None)}"] = _membership(0.58)  # a gap: no such remark
    write_report(results, FULL, tmp_path / "PRIVACY.md")
    assert "already at chance" not in (tmp_path / "PRIVACY.md").read_text()
