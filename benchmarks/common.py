"""Shared pieces of the benchmark suite: timing, machine line, peak RSS, a raw gRPC
baseline over the same TLS, and an aggregator process for round benchmarks."""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import torch

from fedmae.cli.demo import free_port
from fedmae.pki.files import ClientIdentity, ServerCerts
from fedmae.transport.credentials import channel_credentials, server_credentials

MiB = 1 << 20


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine() -> dict:
    import google.protobuf
    import numpy

    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "numpy": numpy.__version__,
        "load_avg": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (peak resident set) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


# ------------------------------------------------------------------ raw gRPC baseline


class RawStreamServer:
    """The minimal baseline: raw bytes in 1 MiB messages, no protobuf, same mTLS."""

    def __init__(self, certs: Path, payload: bytes | memoryview):
        self.payload = memoryview(payload)
        opts = [("grpc.max_receive_message_length", 8 * MiB),
                ("grpc.max_send_message_length", 8 * MiB)]  # fmt: skip
        self.server = grpc.server(futures.ThreadPoolExecutor(4), options=opts)
        handlers = {
            "Sink": grpc.stream_unary_rpc_method_handler(self._sink),
            "Source": grpc.unary_stream_rpc_method_handler(self._source),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Raw", handlers),)
        )
        creds = server_credentials(ServerCerts(certs))
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def _sink(self, requests: Iterator[bytes], context) -> bytes:
        total = 0
        for chunk in requests:
            total += len(chunk)
        return str(total).encode()

    def _source(self, request: bytes, context) -> Iterator[bytes]:
        for offset in range(0, len(self.payload), MiB):
            yield bytes(self.payload[offset : offset + MiB])

    def stop(self) -> None:
        self.server.stop(0)


def raw_channel(port: int, identity: Path) -> grpc.Channel:
    opts = [("grpc.max_receive_message_length", 8 * MiB),
            ("grpc.max_send_message_length", 8 * MiB)]  # fmt: skip
    creds = channel_credentials(ClientIdentity(identity))
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts)


def raw_upload(channel: grpc.Channel, payload: memoryview) -> int:
    sink = channel.stream_unary("/bench.Raw/Sink")
    chunks = (bytes(payload[o : o + MiB]) for o in range(0, len(payload), MiB))
    return int(sink(chunks, timeout=600))


def raw_download(channel: grpc.Channel) -> int:
    source = channel.unary_stream("/bench.Raw/Source")
    return sum(len(c) for c in source(b"", timeout=600))


# ------------------------------------------------------------------ aggregator process


class AggregatorProcess:
    """`fedmae serve` in its own process, so its peak RSS is its own (VmHWM, sampled
    while it runs: it may exit on its own when its rounds are done)."""

    def __init__(self, work: Path, certs: Path, model: str, *args: str):
        self.port = free_port()
        self.state = work / "state"
        self.log = open(work / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmae", "serve", "--state-dir", str(self.state),
             "--certs", str(certs), "--listen", f"127.0.0.1:{self.port}", "--enroll-listen",
             "off", "--model", model, "--max-requests-per-s", "0", *args],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.peak_rss = 0
        self._watch = threading.Thread(target=self._sample, daemon=True)
        self._watch.start()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            try:
                self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.proc.pid))
            except (OSError, RuntimeError):  # exiting
                break
            time.sleep(0.02)

    def stop(self) -> int:
        """Stop the process (if it still runs); its peak RSS in bytes."""
        if self.proc.poll() is None:
            try:
                self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.proc.pid))
            except (OSError, RuntimeError):  # exiting right now: the sampler saw the peak
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._watch.join(timeout=5)
        self.log.close()
        return self.peak_rss
