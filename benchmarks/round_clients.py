"""Benchmark clients for the round cases, in a process of their own (a few such
processes share the clients, so that they do not all queue on one interpreter lock,
as real clients on their own machines would not).

    python -m benchmarks.round_clients --port P --params N --rounds R [--secure] ID_DIR ...

Each client skips training: it downloads the model, then sends a fixed delta, as the
agent would (its last model's memory reused for the next download). Plain and secure
rounds are delivered alike, through ``FederationClient``: a plain client uploads the
delta; a secure one keeps it and answers every phase with the agent's own code
(``client_agent.secure_rounds``), so its masked input is what a real site sends.
The last line on stdout is JSON: per client, the bytes it uploaded and, in secure
rounds, the CPU and wall seconds of building each masked input.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

from client_agent.secure_rounds import SecureRounds, _Round
from fedmae.ml.model_zoo import initial_state
from fedmae.payload.buffers import BufferPool
from fedmae.payload.chunks import DEFAULT_CHUNK_SIZE as CHUNK
from fedmae.payload.layout import ModelLayout
from fedmae.pki.files import ClientIdentity
from fedmae.rounds import Phase, RoundClosed, RoundTask, RunFinished
from fedmae.runtime import tune_malloc
from fedmae.transport.channels import open_channel
from fedmae.transport.federation_client import FederationClient
from fedmae.transport.secagg import answer_message


class MeteredSecureRounds(SecureRounds):
    """The agent's secure rounds, counting what it sends and timing the masking."""

    def __init__(self, client_id: str, identity: ClientIdentity):
        super().__init__(client_id, identity)
        self.message_bytes = 0  # the small answers (keys, sealed shares, revealed shares)
        self.mask_cpu_s: list[float] = []
        self.mask_wall_s: list[float] = []

    def _compute(self, now: _Round, task: RoundTask) -> object:
        if task.phase != Phase.MASKED_INPUT:
            return super()._compute(now, task)
        cpu, wall = time.thread_time(), time.perf_counter()
        ring = super()._compute(now, task)
        self.mask_cpu_s.append(time.thread_time() - cpu)
        self.mask_wall_s.append(time.perf_counter() - wall)
        return ring

    def _send(self, client: FederationClient, phase: Phase, message: object) -> None:
        self.message_bytes += answer_message(message).ByteSize()
        super()._send(client, phase, message)


class Site:
    """One benchmark client: subscribes and answers ``rounds`` rounds."""

    def __init__(self, port: int, identity: Path, layout: ModelLayout, delta, secure: bool):
        self.identity = ClientIdentity(identity)
        self.client = FederationClient(open_channel(f"127.0.0.1:{port}", self.identity))
        self.layout, self.delta = layout, delta
        self.secure = (
            MeteredSecureRounds(self.identity.client_id, self.identity) if secure else None
        )
        self.pool = BufferPool(keep=1)
        self.upload_bytes = 0  # delta or masked input, as the server counted it
        self.stop = threading.Event()

    def run(self, rounds: int) -> None:
        closed = 0
        events = self.client.subscribe("bench", 0)
        try:
            for event in events:
                body = event.body
                if isinstance(body, RoundTask):
                    self._answer(body)
                elif isinstance(body, RoundClosed):
                    if self.secure is not None:
                        self.secure.closed(body.round, body.attempt)
                    closed += 1
                    if closed >= rounds:
                        break
                elif isinstance(body, RunFinished):
                    break
        finally:
            events.cancel()
            self.client.close()

    def _answer(self, task: RoundTask) -> None:
        if task.phase in (Phase.TRAIN, Phase.ADVERTISE_KEYS):
            _, flat = self.client.fetch_model(self.layout, task.model_version, timeout=600,
                                              pool=self.pool)  # fmt: skip
            self.pool.give(flat)
        if task.phase == Phase.TRAIN:
            receipt = self.client.submit_update(
                self.layout, self.delta, round_=task.round, base_version=task.model_version,
                num_samples=1, chunk_size=CHUNK, timeout=600,
            )  # fmt: skip
            self.upload_bytes += receipt.bytes_received
        elif task.phase == Phase.ADVERTISE_KEYS:
            self.secure.trained(self.client, task, self.delta, 1)
        else:
            before = self.secure.current
            self.secure.answer(self.client, task, CHUNK, self.stop)
            if task.phase == Phase.MASKED_INPUT and before is not None:
                ring = before.answers.get(Phase.MASKED_INPUT)
                self.upload_bytes += ring.nbytes if ring is not None else 0

    def figures(self) -> dict:
        out = {"upload_bytes": self.upload_bytes}
        if self.secure is not None:
            out.update(message_bytes=self.secure.message_bytes, mask_cpu_s=self.secure.mask_cpu_s,
                       mask_wall_s=self.secure.mask_wall_s)  # fmt: skip
        return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--params", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--secure", action="store_true", help="answer secure rounds' phases")
    p.add_argument("identities", nargs="+")
    a = p.parse_args()
    tune_malloc()  # as `fedmae client` does
    layout = ModelLayout.from_state(initial_state(f"blob:{a.params}"))
    delta = torch.randn(layout.numel, generator=torch.Generator().manual_seed(0)) * 0.01
    errors: list[BaseException] = []
    sites = [Site(a.port, Path(i), layout, delta, a.secure) for i in a.identities]

    def serve(site: Site) -> None:
        try:
            site.run(a.rounds)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=serve, args=(s,)) for s in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for err in errors:
        print(f"client failed: {err!r}", file=sys.stderr)
    print(json.dumps({s.identity.client_id: s.figures() for s in sites}), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
