"""The client side of the transfer benchmark, in its own process (as a real client is),
so that client and server do not share one interpreter lock. Prints JSON timings.

    python -m benchmarks.transfer_client fedmae --port P --identity DIR --params N --reps R
    python -m benchmarks.transfer_client raw --port P --identity DIR --params N --reps R
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import raw_channel, raw_download, raw_upload
from client_agent.transfer import fetch_model, submit_update
from fedmae.model_zoo import initial_state
from fedmae.tensor_codec import ModelLayout, encode


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fedmae", "raw"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    layout = ModelLayout.from_state(initial_state(f"blob:{a.params}"))
    delta = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0)) * 0.01
    up, down = [], []
    if a.mode == "raw":
        channel = raw_channel(a.port, Path(a.identity))
        payload = encode(delta)
        for _ in range(a.reps + 1):
            t0 = time.perf_counter()
            raw_upload(channel, payload)
            up.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            raw_download(channel)
            down.append(time.perf_counter() - t0)
    else:
        from benchmarks.cases import BenchClient

        client = BenchClient(a.port, Path(a.identity))
        for _ in range(a.reps + 1):
            task = client.tasks.get(timeout=300)
            t0 = time.perf_counter()
            fetch_model(client.stub, layout, task.model_version, timeout=600)
            down.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            submit_update(client.stub, layout, delta, round_=task.round,
                          base_version=task.model_version, num_samples=1, timeout=600)  # fmt: skip
            up.append(time.perf_counter() - t0)
        client.close()
    # The first repetition warms up connections and caches.
    print(json.dumps({"upload_s": statistics.median(up[1:]),
                      "fetch_s": statistics.median(down[1:])}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
