"""A bounded flood of unauthenticated calls on an aggregator's enrollment port, in a
process of its own (as an attacker on another machine would be).

    python tests/enrollment_flood.py --address HOST:PORT --ca ca.pem [--watches N] [--held M]

Opens ``--watches`` ``Health.Watch`` streams over a few connections (TLS, no client
certificate), and ``--held`` ``Enrollment.Enroll`` calls that never send their request
(each would hold a handler thread). Prints one JSON line ``{"started": ...}`` once every
watch is in place (answered, or ended) or ``--settle`` seconds passed; then for each line
on stdin: ``report`` prints the status codes so far and the calls still open; ``stop``
(or end of input, or ``--max-seconds``) cancels every call, prints the final report and
exits. Every call also carries a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import queue
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ENROLL = "/fedmae.v1.Enrollment/Enroll"


class Flood:
    def __init__(self, address: str, ca_pem: bytes, deadline: float):
        self.address, self.ca_pem, self.deadline = address, ca_pem, deadline
        self.codes = {"watch": collections.Counter(), "held": collections.Counter()}
        self.open = {"watch": 0, "held": 0}
        self.answered = 0  # watches that got a first message (served, on a thread)
        self.calls: list = []
        self.channels: list = []
        self._release = asyncio.Event()

    async def start(self, watches: int, held: int, settle: float) -> dict:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        # Separate connections (no shared subchannel), as separate attackers would use.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [
            grpc.aio.secure_channel(self.address, creds, options=options) for _ in range(9)
        ]
        in_place = [asyncio.Event() for _ in range(watches)]
        self.tasks = [
            asyncio.create_task(self._watch(self.channels[i % 3], in_place[i]))
            for i in range(watches)
        ]
        self.tasks += [
            asyncio.create_task(self._held(self.channels[3 + i % 6])) for i in range(held)
        ]
        waits = [asyncio.create_task(e.wait()) for e in in_place]
        await asyncio.wait(waits, timeout=settle)
        for w in waits:
            w.cancel()
        return {"started": watches + held, "in_place": sum(e.is_set() for e in in_place)}

    async def _watch(self, channel, in_place: asyncio.Event) -> None:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=self.deadline
        )
        await self._follow("watch", call, in_place)

    async def _held(self, channel) -> None:
        async def never():
            await self._release.wait()
            return
            yield  # a request stream that sends nothing

        method = channel.stream_stream(
            ENROLL, request_serializer=bytes, response_deserializer=bytes
        )
        await self._follow("held", method(never(), timeout=self.deadline), None)

    async def _follow(self, kind: str, call, in_place: asyncio.Event | None) -> None:
        self.calls.append(call)
        self.open[kind] += 1
        try:
            async for _ in call:
                if in_place is not None and not in_place.is_set():
                    self.answered += 1
                    in_place.set()
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            pass
        self.open[kind] -= 1
        self.codes[kind][(await call.code()).name] += 1
        if in_place is not None:
            in_place.set()

    def report(self) -> dict:
        return {
            "codes": {k: dict(v) for k, v in self.codes.items()},
            "open": dict(self.open),
            "answered": self.answered,
        }

    async def close(self) -> dict:
        self._release.set()
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()
        return self.report()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--watches", type=int, default=2100)
    p.add_argument("--held", type=int, default=24)
    p.add_argument("--settle", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=120.0)
    a = p.parse_args()
    with open(a.ca, "rb") as f:
        ca_pem = f.read()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def make() -> Flood:
        return Flood(a.address, ca_pem, a.max_seconds)

    async def report() -> dict:
        return flood.report()

    flood = run(make())
    print(json.dumps(run(flood.start(a.watches, a.held, a.settle))), flush=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            lines.put(line.strip())
        lines.put(None)  # end of input

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + a.max_seconds  # self-stopping, whatever the caller does
    while True:
        try:
            command = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            break
        if command in (None, "stop"):
            break
        print(json.dumps(run(report())), flush=True)
    print(json.dumps(run(flood.close())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
