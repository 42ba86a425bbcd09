"""docs/ML.md is computed from the experiments' results: its verdicts follow the figures
(met on one side of each target, missed on the other) and its plots are written."""

from __future__ import annotations

import pytest

from scripts.experiments import ALPHAS, QUICK, STRATEGIES, stored_results
from scripts.ml_report import write_report


def _run(kind: str, final: float, **settings) -> dict:
    curve = [(1, final * 1.2), (2, final)]
    return {
        "settings": {"kind": kind, "lr": 0.003, **settings},
        "wall_s": 60.0,
        "final_eval": final,
        "initial_eval": 2.3,
        "curve": curve,
        "bytes_in": 10_000_000 if kind == "fed" else 0,
        "bytes_out": 10_000_000 if kind == "fed" else 0,
        "checkpoints": "x",
        "final_version": 2,
    }


def _results(iid_fed: float, skew_best: float, fed_probe: float) -> dict[str, dict]:
    r = {"central-iid3": _run("central", 0.30, passes=5, images=60000)}
    r["central-iid3"]["by_pass"] = {"2": 0.40}
    r["fed-iid3"] = _run("fed", iid_fed, rounds=5, fraction=1.0, images_per_site=20000)
    r["tune-fedadam-eta0.01"] = _run("fed", 0.5, rounds=2)
    r["tune-fedadam-eta0.1"] = _run("fed", 0.6, rounds=2)
    for alpha in ALPHAS:
        r[f"central-a{alpha:g}"] = _run("central", 0.40, passes=8, images=5000)
        for k, s in enumerate(STRATEGIES):
            loss = skew_best if k == 2 else 0.60
            r[f"fed-a{alpha:g}-{s}"] = _run("fed", loss, rounds=8, images_per_site=500)
    r["fed-many"] = _run("fed", 0.44, sites=100, images_per_site=600, fraction=0.1, rounds=20)
    r["probe-random"] = {"settings": {"kind": "probe"}, "test_accuracy": 0.78}
    for name in [n for n in r if n.startswith(("fed-", "central-"))]:
        accuracy = fed_probe if name == "fed-iid3" else 0.82
        r[f"probe-{name}"] = {"settings": {"kind": "probe"}, "test_accuracy": accuracy}
    return r


def _targets(text: str) -> list[str]:
    table = text.split("## Targets")[1].strip().splitlines()[2:]
    return [row.rsplit("|", 2)[1].strip() for row in table]


@pytest.mark.parametrize(
    ("iid_fed", "skew_best", "fed_probe", "verdicts"),
    [
        (0.314, 0.43, 0.81, ["met", "met", "met"]),  # 1.047, 1.075, -1 / +3 points
        (0.316, 0.45, 0.79, ["missed", "missed", "missed"]),  # 1.053, 1.125, +1 above random
        (0.30, 0.40, 0.85, ["met", "met", "missed"]),  # 3 points above the centralized one
    ],
)
def test_each_target_is_met_or_missed_as_its_figures_say(
    tmp_path, iid_fed, skew_best, fed_probe, verdicts
):
    out = tmp_path / "ML.md"
    write_report(_results(iid_fed, skew_best, fed_probe), QUICK, out)
    text = out.read_text()
    assert _targets(text) == verdicts
    assert f"{iid_fed / 0.30:.3f}" in text
    assert "fedadam, ratio" in text  # the best strategy at alpha 0.3 is named
    assert "**0.5000** (used)" in text  # the tuned knob that section 3 uses
    assert "the twin takes 4220 steps; each site takes 1410" in text  # 5 x 844, 5 x 282
    assert "÷ centralized at equal passes" in text and f"{0.44 / 0.40:.3f}" in text
    for plot in ("ml_iid.png", "ml_dirichlet.png", "ml_probe.png"):
        assert (tmp_path / plot).stat().st_size > 1000


def test_the_iid_verdict_is_on_the_client_processes_when_they_ran(tmp_path):
    results = _results(0.40, 0.43, 0.81)  # the simulated sites: 1.333, missed
    results["fed-iid3-agents"] = _run(
        "fed", 0.31, rounds=5, fraction=1.0, agents=True, images_per_site=20000
    )
    results["probe-fed-iid3-agents"] = {"settings": {"kind": "probe"}, "test_accuracy": 0.815}
    write_report(results, QUICK, tmp_path / "ML.md")
    text = (tmp_path / "ML.md").read_text()
    assert _targets(text)[0] == "met"
    assert "fedmae client processes IID (AdamW kept): ratio 1.033" in text
    assert "| 1.333 |" in text  # the simulated sites' row is still shown


def test_a_probe_not_yet_run_is_not_measured_not_a_verdict(tmp_path):
    results = _results(0.31, 0.43, 0.81)
    del results["probe-fed-iid3"]
    write_report(results, QUICK, tmp_path / "ML.md")
    text = (tmp_path / "ML.md").read_text()
    assert _targets(text)[2] == "not measured" and "| n/a |" in text
    assert "Not probed yet (the run's probe step has not run): fed-iid3." in text


def test_a_start_that_differs_between_runs_is_reported(tmp_path):
    results = _results(0.31, 0.43, 0.81)
    results["fed-many"]["initial_eval"] = 2.5
    write_report(results, QUICK, tmp_path / "ML.md")
    assert "NOT the same in every run" in (tmp_path / "ML.md").read_text()


def test_results_are_read_back_in_the_order_they_finished(tmp_path):
    import json
    import os

    for k, name in enumerate(["b-first", "a-second"]):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "result.json"
        path.write_text(json.dumps({"settings": {"n": k}}))
        os.utime(path, (1000 + k, 1000 + k))
    assert list(stored_results(tmp_path)) == ["b-first", "a-second"]


def test_a_step_with_a_result_for_its_settings_is_kept(tmp_path, capsys):
    from scripts.experiments import Runner

    runner = Runner(tmp_path, QUICK, total=2)
    calls = []
    settings = {"kind": "fed", "strategy_args": ("--lr", "1")}  # a tuple, stored as a list
    runner.step("a", settings, lambda folder: calls.append(folder) or {"final_eval": 1.0})
    again = Runner(tmp_path, QUICK, total=2)  # a resumed run
    kept = again.step("a", settings, lambda folder: calls.append(folder) or {"final_eval": 2.0})
    assert len(calls) == 1 and kept["final_eval"] == 1.0
    assert "done before, kept" in capsys.readouterr().out
