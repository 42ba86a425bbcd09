"""Does secure aggregation cost learning? ``fedmae demo`` (3 sites, 5 rounds, the tiny
MAE, the demo's defaults) with and without ``--secure-aggregation``, a few times each,
side by side.

The aggregate of a secure round equals plain FedAvg up to its quantization bound
(tests/integration/test_secure_rounds.py), so any difference is the runs' own spread:
local training is not bit-reproducible across runs. Prints each run's global eval loss
per round and the ratio of the means at the last round (target: within 2 %).

    .venv/bin/python -m scripts.secagg_learning [--pairs 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(state: Path, secure: bool) -> list[float]:
    """One demo run; the global eval loss of each round."""
    args = [sys.executable, "-m", "fedmae", "demo", "--state-dir", str(state)]
    if secure:
        args.append("--secure-aggregation")
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(x) for x in (state / "rounds.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if r["status"] == "published"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="runs of each mode (default 3)")
    p.add_argument("--out", help="where the demos' state goes (default: a temp dir)")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="fedmae-secagg-learning-"))
    last: dict[str, list[float]] = {"plain": [], "secure": []}
    for k in range(args.pairs):
        for mode in ("plain", "secure"):  # interleaved: the machine's load hits both
            t0 = time.monotonic()
            losses = run_demo(out / f"{mode}-{k + 1}", secure=mode == "secure")
            last[mode].append(losses[-1])
            print(f"{mode:6} run {k + 1}: eval loss by round "
                  f"{' '.join(f'{x:.4f}' for x in losses)} ({time.monotonic() - t0:.0f}s)",
                  flush=True)  # fmt: skip
    plain, secure = statistics.mean(last["plain"]), statistics.mean(last["secure"])
    print(f"last round, mean of {args.pairs}: plain {plain:.4f}, secure {secure:.4f}, "
          f"secure/plain {secure / plain:.4f} (target <= 1.02)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
