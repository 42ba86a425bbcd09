"""A bounded flood of unauthenticated calls on an aggregator's enrollment port, in a
process of its own (as an attacker on another machine would be).

    python tests/enrollment_flood.py --address HOST:PORT --ca ca.pem [--watches N] [--held M]

Opens ``--watches`` ``Health.Watch`` streams over a few connections (TLS, no client
certificate), and ``--held`` ``Enrollment.Enroll`` calls that never send their request
(each would hold a handler thread). Prints one JSON line ``{"started": ...}`` once every
call is open; then for each line on stdin: ``report`` prints the status codes so far and
the calls still open; ``stop`` (or end of input, or ``--max-seconds``) cancels every call,
prints the final report and exits. Every call also carries a deadline.
"""

from __future__ import annotations

import argparse
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
    def __init__(self, address: str, ca_pem: bytes, watches: int, held: int, deadline: float):
        creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        # Separate connections (no shared subchannel), as separate attackers would use.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.secure_channel(address, creds, options=options) for _ in range(9)]
        self.codes: dict[str, collections.Counter] = {
            "watch": collections.Counter(),
            "held": collections.Counter(),
        }
        self.open = {"watch": 0, "held": 0}
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.calls: list[grpc.Future] = []
        for i in range(watches):
            stub = health_pb2_grpc.HealthStub(self.channels[i % 3])
            self._track("watch", stub.Watch(health_pb2.HealthCheckRequest(), timeout=deadline))
        for i in range(held):
            call = self.channels[3 + i % 6].stream_stream(
                ENROLL, request_serializer=bytes, response_deserializer=bytes
            )
            self._track("held", call(self._never(deadline), timeout=deadline))

    def _never(self, deadline: float):
        self._release.wait(deadline)
        return
        yield  # a request stream that sends nothing

    def _track(self, kind: str, call) -> None:
        with self._lock:
            self.open[kind] += 1
        self.calls.append(call)

        def done(c, _kind=kind):
            with self._lock:
                self.open[_kind] -= 1
                self.codes[_kind][c.code().name] += 1

        call.add_done_callback(done)

    def report(self) -> dict:
        with self._lock:
            return {"codes": {k: dict(v) for k, v in self.codes.items()}, "open": dict(self.open)}

    def close(self) -> None:
        self._release.set()
        for call in self.calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--watches", type=int, default=2100)
    p.add_argument("--held", type=int, default=24)
    p.add_argument("--max-seconds", type=float, default=120.0)
    a = p.parse_args()
    with open(a.ca, "rb") as f:
        flood = Flood(a.address, f.read(), a.watches, a.held, a.max_seconds)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            lines.put(line.strip())
        lines.put(None)  # end of input

    threading.Thread(target=read, daemon=True).start()
    print(json.dumps({"started": a.watches + a.held}), flush=True)
    end = time.monotonic() + a.max_seconds  # self-stopping, whatever the caller does
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            break
        if line in (None, "stop"):
            break
        print(json.dumps(flood.report()), flush=True)
    flood.close()
    print(json.dumps(flood.report()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
