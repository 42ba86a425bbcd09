"""The client side of the transfer benchmark, in its own process (as a real client is),
so that client and server do not share one interpreter lock. Prints JSON timings.

    python -m benchmarks.transfer_client --port P --raw-port Q --identity DIR --params N

Each repetition downloads and uploads once through fedmae (FetchModel, SubmitUpdate)
and once through the raw byte stream, interleaved, so that both see the same moments
of this shared machine's load; the fedmae upload comes last, so the round it closes
(aggregation, checkpoint) overlaps nothing timed. The first repetition only warms up.
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
from fedmae.ml.model_zoo import initial_state
from fedmae.payload.buffers import BufferPool
from fedmae.payload.encodings import encode
from fedmae.payload.layout import ModelLayout
from fedmae.runtime import tune_malloc
from fedmae.transport.transfer import fetch_model, submit_update


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--raw-port", type=int, required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    tune_malloc()  # as `fedmae client` does
    layout = ModelLayout.from_state(initial_state(f"blob:{a.params}"))
    delta = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0)) * 0.01
    payload = encode(delta)
    channel = raw_channel(a.raw_port, Path(a.identity))

    from benchmarks.cases import BenchClient

    client = BenchClient(a.port, Path(a.identity))
    times: dict[str, list[float]] = {"fetch_s": [], "raw_fetch_s": [], "upload_s": [],
                                     "raw_upload_s": []}  # fmt: skip

    def timed(key: str, fn, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times[key].append(time.perf_counter() - t0)
        if key == "fetch_s":
            pool.give(out[1])  # as the agent gives it back next round

    pool = BufferPool(keep=1)  # as the agent does: the last model's memory is reused
    for _ in range(a.reps + 1):
        task = client.tasks.get(timeout=300)
        timed("fetch_s", fetch_model, client.stub, layout, task.model_version, timeout=600,
              pool=pool)  # fmt: skip
        timed("raw_fetch_s", raw_download, channel)
        timed("raw_upload_s", raw_upload, channel, payload)
        # last: the round closes after it (aggregate, checkpoint) while nothing is timed
        timed("upload_s", submit_update, client.stub, layout, delta, round_=task.round,
              base_version=task.model_version, num_samples=1, timeout=600)  # fmt: skip
    client.close()
    print(json.dumps({k: statistics.median(v[1:]) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
