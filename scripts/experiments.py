"""``make experiments``: how federated MAE pre-training compares with pooling the data.

Runs the experiments below with the real tools (``fedmae simulate``, ``fedmae
train-central``, ``fedmae probe``) on Fashion-MNIST and writes ``docs/ML.md`` with
tables and plots (``scripts/ml_report.py``):

1. 3 sites IID against the centralized twin, equal data passes (5 over the 54k images);
2. the server optimizers' knobs, tuned on 10 sites at Dirichlet alpha = 0.3;
3. 10 sites at Dirichlet alpha in {0.1, 0.3, 1.0}: FedAvg, FedAvgM, FedAdam, FedProx,
   each beside its centralized twin;
4. 100 sites, 10 % sampled per round;
5. the linear-probe accuracy of every final encoder, the centralized ones and a
   random-init encoder.

Every run's final model is scored by the same exact evaluation: the whole 10k test
split with the fixed, seeded masks of ``EVAL_MASK_SEED`` (``fedmae.ml.training.
evaluate``). The curves are each run's own per-round (per-pass) loss on the first 2k
test images with the same masks: the aggregator's ``--eval-images`` and
train-central's.

Resumable: every step writes ``STATE/NAME/result.json`` and is skipped when that file
is there with the same settings; delete it (or the folder) to run a step again.

    .venv/bin/python -m scripts.experiments [--state experiments-state] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CLIENT_LR = 3e-3  # the demo's tuned default, for every run here
CURVE_IMAGES = 2000  # per-round (per-pass) held-out loss: the first 2k test images
ALPHAS = (0.1, 0.3, 1.0)
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedprox")
FEDADAM_ETAS = (0.01, 0.03, 0.1)  # Reddi et al. 2021 tune eta on a log grid
FEDAVGM_KNOBS = ((1.0, 0.5), (1.0, 0.9), (2.0, 0.5))  # (eta, beta): Hsu et al. 2019
FEDPROX_MU = 0.01


@dataclass(frozen=True)
class Scale:
    """How big each experiment is (the full run, or --quick to check the pipeline)."""

    iid_sites_images: int = 20000  # per site: 3 x 20k = the 60k training split
    iid_rounds: int = 5  # 1 local epoch each: 5 passes
    grid_images: int = 500  # per site, 10 sites
    grid_rounds: int = 4
    sweep_rounds: int = 4
    many_sites: int = 100
    many_images: int = 600
    many_fraction: float = 0.1
    many_rounds: int = 20
    probe_images: int = 10000  # train and test images of the probe
    final_eval_images: int = 0  # 0: the whole test split


QUICK = Scale(
    iid_sites_images=300, iid_rounds=1, grid_images=100, grid_rounds=1, sweep_rounds=1,
    many_sites=20, many_images=50, many_fraction=0.2, many_rounds=1, probe_images=500,
    final_eval_images=500,
)  # fmt: skip


@dataclass(frozen=True)
class Fed:
    sites: int
    images_per_site: int
    rounds: int
    fraction: float = 1.0
    dirichlet: float | None = None
    strategy: str = "fedavg"
    strategy_args: tuple[str, ...] = ()
    workers: int = 2


@dataclass(frozen=True)
class Central:
    sites: int
    images: int  # as the federated run's limit: sites x images per site
    passes: int
    dirichlet: float | None = None


@dataclass
class Runner:
    state: Path
    scale: Scale
    total: int = 0
    done: int = 0
    results: dict[str, dict] = field(default_factory=dict)

    def step(self, name: str, settings: dict, run) -> dict:
        """Run ``run(folder)`` unless ``name`` already has a result for ``settings``."""
        settings = json.loads(json.dumps(settings))  # as stored: a tuple reads back a list
        self.done += 1
        folder = self.state / name
        stored = folder / "result.json"
        if stored.exists():
            result = json.loads(stored.read_text())
            if result.get("settings") == json.loads(json.dumps(settings)):  # tuples: lists
                print(f"[{self.done}/{self.total}] {name}: done before, kept", flush=True)
                self.results[name] = result
                return result
        print(f"[{self.done}/{self.total}] {name}: {describe(settings)}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t0 = time.monotonic()
        result = {"settings": settings, **run(folder)}
        result.setdefault("wall_s", time.monotonic() - t0)
        stored.write_text(json.dumps(result, indent=1))
        result = json.loads(stored.read_text())  # as a later, resumed run reads it
        print(f"    {name}: {summary(result)} in {result['wall_s']:.0f}s", flush=True)
        self.results[name] = result
        return result

    def fed(self, name: str, run: Fed, simulate_args: tuple[str, ...] = ()) -> dict:
        """A ``fedmae simulate`` run; ``simulate_args``: more of its flags (e.g. attacks)."""
        settings = {"kind": "fed", **asdict(run), "lr": CLIENT_LR}
        if simulate_args:  # only when given: earlier runs' settings stay as they were
            settings["simulate_args"] = list(simulate_args)

        def go(folder: Path) -> dict:
            state = folder / "state"
            serve_args = [
                "--lr", str(CLIENT_LR), "--eval-images", str(CURVE_IMAGES),
                "--round-timeout", "1800", *run.strategy_args,
            ]  # fmt: skip
            cmd = [
                sys.executable, "-m", "fedmae", "simulate",
                "--sites", str(run.sites), "--workers", str(run.workers),
                "--fraction", str(run.fraction), "--rounds", str(run.rounds),
                "--images-per-site", str(run.images_per_site), "--strategy", run.strategy,
                "--state-dir", str(state), "--round-timeout", "1800",
                "--serve-args", " ".join(serve_args),
                *(["--dirichlet", str(run.dirichlet)] if run.dirichlet is not None else []),
                *simulate_args,
            ]  # fmt: skip
            t0 = time.monotonic()
            stream(cmd, folder / "output.log", lambda line: line[:5].strip().isdigit())
            wall = time.monotonic() - t0
            records, published = finished_run(name, state, run.rounds)
            passes = run.fraction * 1  # one local epoch a round: passes over the pool
            return {
                **run_totals(state, records, published, wall),
                "curve": [(r["round"] * passes, r["eval_loss"]) for r in published],
                "final_eval": self.final_eval(state / "checkpoints", None),
                "initial_eval": self.final_eval(state / "checkpoints", 0),
                "dp": published[-1].get("dp"),  # ε after the last round, σ, C (--dp central)
            }

        return self.step(name, settings, go)

    def agents(self, name: str, sites: int, images_per_site: int, rounds: int) -> dict:
        """The same federation with real ``fedmae client`` processes (``fedmae demo``):
        unlike a simulated site, each keeps its AdamW state from round to round."""
        settings = {
            "kind": "fed", "agents": True, "sites": sites, "images_per_site": images_per_site,
            "rounds": rounds, "fraction": 1.0, "strategy": "fedavg", "lr": CLIENT_LR,
        }  # fmt: skip

        def go(folder: Path) -> dict:
            state = folder / "state"
            cmd = [
                sys.executable, "-m", "fedmae", "demo", "--clients", str(sites),
                "--rounds", str(rounds), "--images-per-client", str(images_per_site),
                "--local-epochs", "1", "--lr", str(CLIENT_LR), "--state-dir", str(state),
            ]  # fmt: skip
            t0 = time.monotonic()
            stream(cmd, folder / "output.log", lambda line: line[:5].strip().isdigit())
            wall = time.monotonic() - t0
            records, published = finished_run(name, state, rounds)
            checkpoints = state / "checkpoints"
            return {
                **run_totals(state, records, published, wall),
                # The demo's aggregator scores 500 images; the curve here is the others'.
                "curve": [
                    (r["round"], self.final_eval(checkpoints, r["version"], CURVE_IMAGES))
                    for r in published
                ],
                "final_eval": self.final_eval(checkpoints, None),
                "initial_eval": self.final_eval(checkpoints, 0),
            }

        return self.step(name, settings, go)

    def central(self, name: str, run: Central) -> dict:
        settings = {"kind": "central", **asdict(run), "lr": CLIENT_LR}

        def go(folder: Path) -> dict:
            cmd = [
                sys.executable, "-m", "fedmae", "train-central", "--out", str(folder),
                "--passes", str(run.passes), "--sites", str(run.sites),
                "--images", str(run.images), "--lr", str(CLIENT_LR),
                "--eval-images", str(CURVE_IMAGES), "--threads", "2",
                "--progress-every", "30",
                *(["--dirichlet", str(run.dirichlet)] if run.dirichlet is not None else []),
            ]  # fmt: skip
            t0 = time.monotonic()
            stream(cmd, folder / "output.log", lambda line: "central:" in line)
            wall = time.monotonic() - t0
            log = json.loads((folder / "central.json").read_text())
            return {
                "wall_s": wall,
                "checkpoints": str(folder / "checkpoints"),
                "final_version": run.passes,
                "curve": [(p["pass"], p["eval_loss"]) for p in log["passes"]],
                "bytes_in": 0,
                "bytes_out": 0,
                "final_eval": self.final_eval(folder / "checkpoints", None),
                "initial_eval": self.final_eval(folder / "checkpoints", 0),
                "by_pass": {
                    p: self.final_eval(folder / "checkpoints", p) for p in range(1, run.passes)
                },
            }

        return self.step(name, settings, go)

    def probe(self, name: str, checkpoints: str | None, version: int | None = None) -> dict:
        n = self.scale.probe_images
        settings = {"kind": "probe", "of": checkpoints, "version": version, "images": n}

        def go(folder: Path) -> dict:
            out = folder / "probe.json"
            what = ["--random-init"] if checkpoints is None else [checkpoints]
            if version is not None:
                what += ["--version", str(version)]
            cmd = [
                sys.executable, "-m", "fedmae", "probe", *what, "--train-images", str(n),
                "--test-images", str(n), "--threads", "2", "--json", str(out),
            ]  # fmt: skip
            stream(cmd, folder / "output.log", lambda line: line.startswith("linear probe"))
            return json.loads(out.read_text())

        return self.step(name, settings, go)

    def final_eval(self, checkpoints: Path, version: int | None, images: int = 0) -> float:
        """The exact evaluation: held-out masked-patch MSE on the whole test split (or
        its first ``images``, with the same masks)."""
        from fedmae.cli.checkpoints import load_checkpoint, locate
        from fedmae.ml.loaders import load_dataset
        from fedmae.ml.training import EVAL_MASK_SEED, evaluate

        store, v = locate(checkpoints, version)
        model = load_checkpoint(store, v).model
        test = load_dataset("fashion-mnist", split="test")
        n = images or self.scale.final_eval_images or len(test)
        return evaluate(model, test.to_tensor(list(range(n))), 0.75, seed=EVAL_MASK_SEED)


def round_log(state: Path) -> list[dict]:
    """The round records of a state directory's ``rounds.jsonl``."""
    return [json.loads(x) for x in (state / "rounds.jsonl").read_text().splitlines()]


def finished_run(name: str, state: Path, rounds: int) -> tuple[list[dict], list[dict]]:
    """(every round record, the published ones) of a run that should have published
    ``rounds`` rounds; RuntimeError, naming ``name``, when it published fewer."""
    records = round_log(state)
    published = [r for r in records if r["status"] == "published"]
    if len(published) < rounds:
        raise RuntimeError(f"{name}: {len(published)} of {rounds} rounds published")
    return records, published


def run_totals(state: Path, records: list[dict], published: list[dict], wall: float) -> dict:
    """What every federated result holds: wall time, checkpoints, final version, bytes."""
    return {
        "wall_s": wall,
        "checkpoints": str(state / "checkpoints"),
        "final_version": published[-1]["version"],
        "bytes_in": sum(r.get("bytes_in", 0) for r in records),
        "bytes_out": sum(r.get("bytes_out", 0) for r in records),
    }


def stream(cmd: list[str], log: Path, show) -> None:
    """Run ``cmd``, its output to ``log``; echo the lines ``show`` picks (progress)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if show(line):
                print("      " + line.rstrip()[:110], flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(cmd[2:5])} failed (exit {proc.returncode}); see {log}")


def describe(settings: dict) -> str:
    shown = {k: v for k, v in settings.items() if k != "kind" and v not in ((), [], None)}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def summary(result: dict) -> str:
    if "auc" in result:
        return f"membership AUC {result['auc']:.3f}"
    if "test_accuracy" in result:
        return f"probe accuracy {result['test_accuracy']:.4f}"
    return f"final eval loss {result['final_eval']:.4f}"


def plan_size(scale: Scale) -> int:
    sweeps = len(FEDADAM_ETAS) + len(FEDAVGM_KNOBS)
    grid = len(ALPHAS) * (1 + len(STRATEGIES))
    runs = 3 + sweeps + grid + 1
    probes = 3 + grid + 1 + 1
    return runs + probes


def run_all(runner: Runner) -> None:
    s = runner.scale
    # 1. 3 sites IID against the centralized twin at equal passes.
    runner.central("central-iid3", Central(3, 3 * s.iid_sites_images, s.iid_rounds))
    runner.agents("fed-iid3-agents", 3, s.iid_sites_images, s.iid_rounds)
    runner.probe("probe-random", None)  # the probes that decide a target come first
    for name in ("central-iid3", "fed-iid3-agents"):
        probe_of(runner, name)
    # 2. The server optimizers' knobs, tuned at alpha 0.3 (fewer rounds).
    grid = dict(sites=10, images_per_site=s.grid_images)
    adam = {
        eta: runner.fed(
            f"tune-fedadam-eta{eta:g}",
            Fed(**grid, rounds=s.sweep_rounds, dirichlet=0.3, strategy="fedadam",
                strategy_args=("--server-lr", str(eta))),
        )["final_eval"]
        for eta in FEDADAM_ETAS
    }  # fmt: skip
    avgm = {
        (m_eta, beta): runner.fed(
            f"tune-fedavgm-eta{m_eta:g}-beta{beta:g}",
            Fed(**grid, rounds=s.sweep_rounds, dirichlet=0.3, strategy="fedavgm",
                strategy_args=("--server-lr", str(m_eta), "--server-momentum", str(beta))),
        )["final_eval"]
        for m_eta, beta in FEDAVGM_KNOBS
    }  # fmt: skip
    eta, (m_eta, beta) = min(adam, key=adam.__getitem__), min(avgm, key=avgm.__getitem__)
    knobs = {
        "fedavg": (),
        "fedavgm": ("--server-lr", str(m_eta), "--server-momentum", str(beta)),
        "fedadam": ("--server-lr", str(eta)),
        "fedprox": ("--mu", str(FEDPROX_MU)),
    }
    # 3. 10 sites, label skew: each strategy beside the centralized twin.
    for alpha in ALPHAS:
        runner.central(f"central-a{alpha:g}", Central(10, 10 * s.grid_images, s.grid_rounds, alpha))
        for strategy in STRATEGIES:
            runner.fed(
                f"fed-a{alpha:g}-{strategy}",
                Fed(**grid, rounds=s.grid_rounds, dirichlet=alpha, strategy=strategy,
                    strategy_args=knobs[strategy]),
            )  # fmt: skip
    # 4. Many sites, few per round.
    runner.fed(
        "fed-many",
        Fed(s.many_sites, s.many_images, s.many_rounds, fraction=s.many_fraction),
    )
    probe_of(runner, "fed-many")
    # 5. Linear probes of the label-skew grid's encoders.
    for name in [n for n in list(runner.results) if n.startswith(("fed-a", "central-a"))]:
        probe_of(runner, name)
    # 6. The 3 IID sites again as simulated sites (a fresh AdamW each round).
    runner.fed("fed-iid3", Fed(3, s.iid_sites_images, s.iid_rounds, workers=3))
    probe_of(runner, "fed-iid3")


def probe_of(runner: Runner, name: str) -> dict:
    """The linear probe of run ``name``'s final encoder."""
    result = runner.results[name]
    return runner.probe(f"probe-{name}", result["checkpoints"], result["final_version"])


def stored_results(state: Path) -> dict[str, dict]:
    """Every step's result in ``state``, in the order the steps finished."""
    files = sorted(state.glob("*/result.json"), key=lambda f: f.stat().st_mtime)
    return {f.parent.name: json.loads(f.read_text()) for f in files}


def campaign_main(argv, doc: str, state: str, report: str, scales, plan_size, run, write) -> int:
    """The command line both campaigns share (this one and ``scripts/privacy_eval.py``):
    ``--state``, ``--quick``, ``--out``, ``--report-only``; ``scales`` = (full, quick),
    ``run(runner)`` runs the steps, ``write(results, scale, out)`` writes the report."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--state", default=state, help="runs (default %(default)s)")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: check the pipeline (default off)"
    )
    p.add_argument("--out", help=f"the Markdown report (default {report}; with --quick in STATE)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the results there, run nothing (default off)",
    )
    args = p.parse_args(argv)
    scale = scales[1] if args.quick else scales[0]
    folder = Path(args.state + ("-quick" if args.quick else ""))
    out = Path(args.out or (folder / Path(report).name if args.quick else report))
    runner = Runner(folder, scale, total=plan_size(scale))
    t0 = time.monotonic()
    if args.report_only:
        runner.results = stored_results(folder)
    else:
        run(runner)
    write(runner.results, scale, out)
    print(f"done in {time.monotonic() - t0:.0f}s: {out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from scripts.ml_report import write_report

    return campaign_main(
        argv, __doc__, "experiments-state", "docs/ML.md", (Scale(), QUICK), plan_size, run_all,
        write_report,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
