"""`make bench` / `make bench-quick`: run the suite, write benchmarks/results/*.json and
docs/BENCHMARKS.md (tables and plots). Every timing has its same-run baseline."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import cases
from benchmarks.common import machine
from benchmarks.render import render
from benchmarks.robust_case import bench_robust
from benchmarks.secagg_case import bench_secagg

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

FULL = {
    "kernel": {"params": 25_000_000},
    "transfer": {"params": 100_000_000},
    "rounds": {"params": [1_000_000, 10_000_000, 50_000_000], "clients": [2, 4, 16]},
    "many_clients": {"clients": 256},
    "big_model": {"params": 600_000_000},
    "encodings": {"rounds": 5, "clients": 3, "images": 1500},
    "training": {"images": 3000},
    "secagg": {"cases": [(1_000_000, 16), (10_000_000, 4)], "rounds": 4, "repeats": 2},
    "robust": {"cases": [(10_000_000, 8)], "rounds": 3, "repeats": 1},
}
QUICK = {
    "kernel": {"params": 5_000_000},
    "transfer": {"params": 10_000_000},
    "rounds": {"params": [1_000_000, 10_000_000], "clients": [2, 4]},
    "many_clients": {"clients": 32},
    "encodings": {"rounds": 2, "clients": 2, "images": 300},
    "training": {"images": 800},
    "secagg": {"cases": [(1_000_000, 4)], "rounds": 3, "repeats": 1},
    "robust": {"cases": [(1_000_000, 5)], "rounds": 3, "repeats": 1},  # Krum: n > 2f + 2
}
CASES = ["kernel", "transfer", "rounds", "many_clients", "big_model", "encodings", "training",
         "secagg", "robust"]  # fmt: skip


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def run(plan: dict, only: list[str]) -> dict:
    results: dict = {"machine": machine(), "quick": plan is QUICK, "cases": {}}
    out = results["cases"]
    raw_rate = None
    for name in CASES:
        if name not in plan or (only and name not in only):
            continue
        t0 = time.monotonic()
        p = plan[name]
        say(f"{name} ...")
        if name == "kernel":
            out[name] = cases.bench_kernel(p["params"])
        elif name == "transfer":
            out[name] = cases.bench_transfer(p["params"])
            raw_rate = out[name]["raw_upload_MiBps"]
        elif name == "rounds":
            out[name] = [
                cases.bench_round(params, n, raw_MiBps=raw_rate)
                for params in p["params"]
                for n in p["clients"]
            ]
        elif name == "many_clients":
            out[name] = cases.bench_round(1_301_648, p["clients"], rounds=3, raw_MiBps=raw_rate)
        elif name == "big_model":
            out[name] = cases.bench_round(p["params"], 2, rounds=1, raw_MiBps=raw_rate)
        elif name == "encodings":
            out[name] = cases.bench_encodings(p["rounds"], p["clients"], p["images"],
                                              ["fp32", "fp16", "bf16", "int8"])  # fmt: skip
        elif name == "training":
            out[name] = cases.bench_training(p["images"])
        elif name == "secagg":
            out[name] = [
                bench_secagg(params, n, p["rounds"], p["repeats"]) for params, n in p["cases"]
            ]
        elif name == "robust":
            out[name] = [
                bench_robust(params, n, p["rounds"], p["repeats"]) for params, n in p["cases"]
            ]
        say(f"{name} done in {time.monotonic() - t0:.0f}s: {json.dumps(out[name])[:300]}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; under 3 minutes")
    parser.add_argument("--only", nargs="*", default=[], choices=CASES)
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument("--into", metavar="RESULTS_JSON",
                        help="merge the cases run now into an earlier run's results "
                        "(a new file; the docs say which run each case is from)")  # fmt: skip
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only rewrite docs/BENCHMARKS.md from a results file")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text()), ROOT / "docs"), flush=True)
        return 0
    results = run(QUICK if args.quick else FULL, args.only)
    if args.into:
        earlier = json.loads(Path(args.into).read_text())
        for name, figures in results["cases"].items():
            earlier["cases"][name] = figures
            earlier.setdefault("machine_of", {})[name] = results["machine"]
        results = earlier
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{'quick' if args.quick else 'full'}-{stamp}.json"
    path.write_text(json.dumps(results, indent=1))
    say(f"results: {path.relative_to(ROOT)}")
    # docs/BENCHMARKS.md holds a full run: a quick one only prints its table
    table = render(results, ROOT / "docs", write=not (args.no_docs or args.quick))
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
