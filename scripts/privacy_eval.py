"""``make privacy-eval``: what differential privacy costs and protects, and what the
robust rules stop.

Runs, with the real tools (``fedmae simulate`` over mTLS, many sites in few
processes), on Fashion-MNIST, and writes ``docs/PRIVACY.md`` with tables and plots
(``scripts/privacy_report.py``):

1. **Utility:** 100 sites (IID, 600 images each), 10 % per round (Poisson under DP),
   the tiny MAE, ``Scale.rounds`` rounds: no DP, and central DP (``--dp central
   --dp-target-epsilon E --dp-delta 1e-5``, σ calibrated for the rounds) for E in
   {1, 4, 8}. Each final model's exact held-out loss on the whole 10k test split
   (``scripts.experiments.Runner.final_eval``).
   The same for ``--dp distributed`` (``--secure-aggregation``: each site adds its
   Skellam share before masking; σ calibrated without amplification by sampling).
   **What it would take:** the noise a larger population N would add at ε = 8 (the
   noise on the mean is σ·C/(q·N), so this run's σ is the ε = 8 run's σ times
   ``sites / N``; the model sees that noise, this run's own ε is far larger and is
   reported as such) for N in ``POPULATIONS``.
2. **Membership inference** (``fedmae.privacy.membership``, Yeom et al. 2018) on the
   final model of the no-DP and the ε = 8 runs: the training images of the site that
   took part in the most rounds against as many held-out test images.
   **A control** where the attack has something to find: 3 sites of 100 images, every
   site in every round, 20 local epochs, 15 rounds (the model sees each image 300
   times), without DP and with central DP at ε = 8. (5 sites, 60 passes left no gap:
   members' loss 0.64, test images' 0.62.)
3. **Poisoning:** 5 sites, every one in every round, 5 rounds; site-1 malicious
   (``fedmae simulate --malicious 1 --attack A``) for each attack, under FedAvg and
   each robust rule, against the clean FedAvg run. The server's own norm bound is off
   (``--max-update-norm off``): each rule stands alone.

Resumable as ``scripts/experiments.py`` (its ``Runner``): every step writes
``STATE/NAME/result.json`` and is skipped when that file is there with the same
settings. ``--quick`` runs tiny sizes to check the pipeline and writes
``STATE-quick/PRIVACY.md``.

    .venv/bin/python -m scripts.privacy_eval [--state privacy-state] [--quick]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from scripts.experiments import Fed, Runner, campaign_main, round_log

DELTA = 1e-5
EPSILONS = (1.0, 4.0, 8.0)
POPULATIONS = (1_000, 10_000, 100_000)  # emulated at ε = 8 (docstring, 1.)
MEMBERSHIP_EPSILON = 8.0  # the DP run the membership attack is tried on (and no DP)
ATTACKS = ("scale", "signflip", "noise", "claim")  # client_agent.attacks.ATTACKS
RULES = ("fedavg", "median", "trimmed-mean", "multi-krum", "norm-bounded")
# Every site in every round, and Krum (f = 1) needs 2f + 3 = 5 updates to publish.
POISON_SERVE_ARGS = ("--max-update-norm", "off", "--min-clients", "5", "--min-participants", "5")


@dataclass(frozen=True)
class Scale:
    """How big each experiment is (the full run, or --quick to check the pipeline).

    The full run's size, estimated (not yet timed end to end): a local step of the
    tiny MAE (batch 64) takes 0.25 s on one core of this 2-core machine, so a round of
    10 sites x 540 images is 85 steps, ~15-25 s on two workers, and a utility run of 20
    rounds with its start and exact evaluations ~7-9 min: ~35 min for the four. A
    poisoning run (5 sites, 5 rounds: 215 steps) is ~1-1.5 min with its ~40 s of start
    (measured by --quick): ~25-30 min for the 21. About 1 h in all.
    """

    sites: int = 100
    images_per_site: int = 600
    fraction: float = 0.1
    rounds: int = 20
    poison_sites: int = 5
    poison_images: int = 600
    poison_rounds: int = 5
    overfit_sites: int = 3
    overfit_images: int = 100
    overfit_rounds: int = 15
    overfit_epochs: int = 20
    attacks: tuple[str, ...] = ATTACKS
    rules: tuple[str, ...] = RULES
    final_eval_images: int = 0  # 0: the whole test split
    workers: int = 2


QUICK = Scale(
    sites=10, images_per_site=60, fraction=0.3, rounds=1, poison_images=60, poison_rounds=1,
    overfit_images=30, overfit_rounds=1, overfit_epochs=1,
    attacks=("scale", "claim"), final_eval_images=500,
)  # fmt: skip


def utility_name(epsilon: float | None, mode: str = "central") -> str:
    if epsilon is None:
        return "utility-nodp"
    return f"utility-eps{epsilon:g}" if mode == "central" else f"utility-{mode}-eps{epsilon:g}"


def population_name(population: int) -> str:
    return f"utility-eps8-as-N{population}"


def poison_name(attack: str | None, rule: str = "fedavg") -> str:
    if attack is None:
        return "poison-clean" if rule == "fedavg" else f"poison-clean-{rule}"
    return f"poison-{attack}-{rule}"


def clean_replica_name(seed: int) -> str:
    return f"poison-clean-seed{seed}"


CLEAN_REPLICA_SEEDS = (1, 2)  # the clean FedAvg run again with other seeds: its spread


def dp_args(epsilon: float, mode: str = "central") -> tuple[str, ...]:
    return ("--dp", mode, "--dp-target-epsilon", f"{epsilon:g}", "--dp-delta", f"{DELTA:g}")


def run_utility(runner: Runner) -> None:
    s = runner.scale
    for epsilon in (None, *EPSILONS):
        run = Fed(
            s.sites, s.images_per_site, s.rounds, fraction=s.fraction, workers=s.workers,
            strategy_args=() if epsilon is None else dp_args(epsilon),
        )  # fmt: skip
        runner.fed(utility_name(epsilon), run)


def run_distributed(runner: Runner) -> None:
    """Utility under --dp distributed: the sites add the noise, secure aggregation sums."""
    s = runner.scale
    for epsilon in EPSILONS:
        run = Fed(
            s.sites, s.images_per_site, s.rounds, fraction=s.fraction, workers=s.workers,
            strategy_args=dp_args(epsilon, "distributed"),
        )  # fmt: skip
        runner.fed(utility_name(epsilon, "distributed"), run, ("--secure-aggregation",))


def run_populations(runner: Runner) -> None:
    """ε = 8's noise as a population of N sites would add it (module docstring, 1.)."""
    s = runner.scale
    sigma = runner.results[utility_name(8.0)]["dp"]["noise_multiplier"]
    for population in POPULATIONS:
        args = (
            "--dp", "central", "--dp-noise-multiplier", f"{sigma * s.sites / population:.6g}",
            "--dp-delta", f"{DELTA:g}",
        )  # fmt: skip
        run = Fed(
            s.sites, s.images_per_site, s.rounds, fraction=s.fraction, workers=s.workers,
            strategy_args=args,
        )  # fmt: skip
        runner.fed(population_name(population), run)


def run_membership(runner: Runner) -> None:
    for epsilon in (None, MEMBERSHIP_EPSILON):
        fed = runner.results[utility_name(epsilon)]
        membership(runner, f"membership-{utility_name(epsilon)}", fed)


def overfit_name(epsilon: float | None) -> str:
    return "overfit-nodp" if epsilon is None else f"overfit-eps{epsilon:g}"


def run_overfit_control(runner: Runner) -> None:
    """The membership attack where it has something to find (module docstring, 2.)."""
    s = runner.scale
    every = ("--min-clients", str(s.overfit_sites), "--min-participants", str(s.overfit_sites))
    for epsilon in (None, MEMBERSHIP_EPSILON):
        args = ("--local-epochs", str(s.overfit_epochs), *every)
        run = Fed(
            s.overfit_sites, s.overfit_images, s.overfit_rounds, fraction=1.0,
            workers=s.workers, strategy_args=args + (() if epsilon is None else dp_args(epsilon)),
        )  # fmt: skip
        fed = runner.fed(overfit_name(epsilon), run)
        membership(runner, f"membership-{overfit_name(epsilon)}", fed)


def membership(runner: Runner, name: str, fed: dict) -> dict:
    """Yeom et al.'s attack on ``fed``'s final model: the training images of the site
    that took part in the most published rounds against as many test images."""
    st = fed["settings"]
    settings = {
        "kind": "membership", "of": fed["checkpoints"], "version": fed["final_version"],
        "model_loss": fed["final_eval"],  # a rerun of the federated run is a new model
    }  # fmt: skip

    def go(folder: Path) -> dict:
        import numpy as np

        from client_agent.simulation import WorkerSpec, site_images
        from fedmae.cli.checkpoints import load_checkpoint, locate
        from fedmae.ml.loaders import load_dataset
        from fedmae.privacy.membership import loss_threshold_attack, per_image_losses

        state = Path(fed["checkpoints"]).parent
        records = round_log(state)
        taken = Counter(p for r in records if r["status"] == "published" for p in r["participants"])
        site, rounds_in = min(taken.items(), key=lambda kv: (-kv[1], kv[0]))
        index = int(site.rsplit("-", 1)[1]) - 1  # site-001 is shard 0
        train = load_dataset("fashion-mnist")
        spec = WorkerSpec(
            server="-", sites=[(index, "-")], num_sites=st["sites"],
            limit=st["sites"] * st["images_per_site"], seed=0,
        )  # fmt: skip
        members = site_images(train, spec)[index].load()[0]  # exactly the site's shard
        test = load_dataset("fashion-mnist", split="test")
        chosen = np.random.default_rng(0).choice(len(test), size=len(members), replace=False)
        nonmembers = test.to_tensor(sorted(chosen.tolist()))
        store, version = locate(Path(fed["checkpoints"]), fed["final_version"])
        model = load_checkpoint(store, version).model
        m_loss = per_image_losses(model, members, 0.75)
        n_loss = per_image_losses(model, nonmembers, 0.75)
        result = loss_threshold_attack(m_loss, n_loss)
        return {
            "site": site, "rounds_in": rounds_in,
            "rounds": sum(r["status"] == "published" for r in records),
            "auc": result.auc, "advantage": result.advantage, "threshold": result.threshold,
            "members": result.members, "nonmembers": result.nonmembers,
            "member_loss": result.member_loss, "nonmember_loss": result.nonmember_loss,
            "member_losses": m_loss.tolist(), "nonmember_losses": n_loss.tolist(),
        }  # fmt: skip

    return runner.step(name, settings, go)


def poison_run(s: Scale, rule: str) -> Fed:
    """A poisoning-sized run (every site in every round) under ``rule``."""
    return Fed(
        s.poison_sites, s.poison_images, s.poison_rounds, fraction=1.0, strategy=rule,
        strategy_args=POISON_SERVE_ARGS, workers=s.workers,
    )  # fmt: skip


def run_poisoning(runner: Runner) -> None:
    s = runner.scale
    runner.fed(poison_name(None), poison_run(s, "fedavg"))
    for attack in s.attacks:
        for rule in s.rules:
            runner.fed(
                poison_name(attack, rule), poison_run(s, rule),
                ("--malicious", "1", "--attack", attack),
            )  # fmt: skip


def run_clean_spread(runner: Runner) -> None:
    """How much the clean run alone varies (other seeds), and each rule's clean loss."""
    s = runner.scale
    for seed in CLEAN_REPLICA_SEEDS:
        runner.fed(clean_replica_name(seed), poison_run(s, "fedavg"), ("--seed", str(seed)))
    for rule in s.rules[1:]:
        runner.fed(poison_name(None, rule), poison_run(s, rule))


def plan_size(scale: Scale) -> int:
    utility = 1 + 2 * len(EPSILONS) + len(POPULATIONS)
    clean = 1 + len(CLEAN_REPLICA_SEEDS) + len(scale.rules) - 1
    return utility + 2 + 4 + clean + len(scale.attacks) * len(scale.rules)


def run_all(runner: Runner) -> None:
    run_utility(runner)
    run_membership(runner)
    run_poisoning(runner)
    run_populations(runner)
    run_distributed(runner)
    run_clean_spread(runner)
    run_overfit_control(runner)


def main(argv: list[str] | None = None) -> int:
    from scripts.privacy_report import write_report

    return campaign_main(
        argv, __doc__, "privacy-state", "docs/PRIVACY.md", (Scale(), QUICK), plan_size, run_all,
        write_report,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
