"""Benchmark clients for the round cases, in a process of their own (a few such
processes share the clients, so that they do not all queue on one interpreter lock,
as real clients on their own machines would not).

    python -m benchmarks.round_clients --port P --params N --rounds R ID_DIR [ID_DIR ...]

Each client skips training: it downloads the model, then sends a fixed delta, as the
agent would (its last model's memory reused for the next download).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import torch

from benchmarks.cases import BenchClient
from fedmae.ml.model_zoo import initial_state
from fedmae.payload.buffers import BufferPool
from fedmae.payload.layout import ModelLayout
from fedmae.runtime import tune_malloc
from fedmae.transport.transfer import fetch_model, submit_update


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("identities", nargs="+")
    a = p.parse_args()
    tune_malloc()  # as `fedmae client` does
    layout = ModelLayout.from_state(initial_state(f"blob:{a.params}"))
    delta = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0)) * 0.01
    errors: list[BaseException] = []

    def serve(identity: str) -> None:
        client = BenchClient(a.port, Path(identity))
        pool = BufferPool(keep=1)
        try:
            for _ in range(a.rounds):
                task = client.tasks.get(timeout=600)
                _, flat = fetch_model(client.stub, layout, task.model_version, timeout=600,
                                      pool=pool)  # fmt: skip
                submit_update(client.stub, layout, delta, round_=task.round,
                              base_version=task.model_version, num_samples=1,
                              timeout=600)  # fmt: skip
                pool.give(flat)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
        finally:
            client.close()

    threads = [threading.Thread(target=serve, args=(i,)) for i in a.identities]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for err in errors:
        print(f"client failed: {err!r}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
