"""The benchmark cases. Each returns a dict of figures; every timing comes with its
baseline measured in the same run, on the same data, and their ratio."""

from __future__ import annotations

import json
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from aggregator_service.config import RoundPolicy, ServerConfig
from aggregator_service.registry import Registry
from aggregator_service.rpc.server import AggregatorServer
from aggregator_service.strategies import FedAvg
from benchmarks.common import (
    AggregatorProcess,
    MiB,
    RawStreamServer,
    median_time,
)
from fedmae.config import TrainingConfig
from fedmae.ml.fashion_mnist import load_fashion_mnist
from fedmae.ml.model_zoo import build_model, initial_state
from fedmae.ml.partitions import client_split
from fedmae.ml.training import batches, make_optimizer, train_local
from fedmae.payload.encodings import encode
from fedmae.payload.layout import ModelLayout
from fedmae.pki.files import ClientIdentity
from fedmae.pki.issue import init_certs, issue_client
from fedmae.pki.peer import certificate_info
from fedmae.transport._proto import federation_pb2 as pb
from fedmae.transport.channels import open_channel
from fedmae.transport.transfer import federation_stub

# ------------------------------------------------------------------ helpers


class Federation:
    """Certificates and registered client identities in a scratch directory."""

    def __init__(self, names: list[str]):
        self.work = Path(tempfile.mkdtemp(prefix="fedmae-bench-"))
        self.certs = init_certs(self.work / "certs").dir
        registry = Registry(self.work / "state" / "fedmae.db")
        self.ids = {}
        for name in names:
            ident = issue_client(self.certs, name, self.work / "ids" / name)
            info = certificate_info(ident.cert.read_bytes())
            registry.register("bench", name, info.fingerprint, info.serial, info.not_after)
            self.ids[name] = ident.dir
        registry.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class BenchClient:
    def __init__(self, port: int, identity: Path):
        self.channel = open_channel(f"127.0.0.1:{port}", ClientIdentity(identity))
        self.stub = federation_stub(self.channel)
        self.tasks: queue.Queue = queue.Queue()
        self._call = self.stub.Subscribe(pb.SubscribeRequest(agent_version="bench"))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for event in self._call:
                if event.WhichOneof("event") == "task":
                    self.tasks.put(event.task)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._call.cancel()
        self.channel.close()


def _layout(params: int) -> ModelLayout:
    return ModelLayout.from_state(initial_state(f"blob:{params}"))


def _delta(layout: ModelLayout, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.numel, generator=g) * 0.01


# ------------------------------------------------------------------ aggregation kernel


def bench_kernel(params: int, updates: int = 8, reps: int = 5) -> dict:
    """FedAvg's accumulate path vs bare torch add_ on the same arrays (1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deltas = [torch.randn(params) * 0.01 for _ in range(updates)]
    weights = [10 + i for i in range(updates)]
    strategy = FedAvg()

    def ours():
        strategy.begin_round(params)
        for d, n in zip(deltas, weights, strict=True):
            strategy.accumulate(d, n)

    acc = torch.zeros(params)

    def baseline():
        acc.zero_()
        for d, n in zip(deltas, weights, strict=True):
            acc.add_(d, alpha=float(n))

    try:
        t_ours, _ = median_time(ours, reps)
        t_base, _ = median_time(baseline, reps)
    finally:
        torch.set_num_threads(threads)  # the in-process servers of later cases use them all
    moved = updates * params * 12  # read x, read acc, write acc (float32)
    return {
        "params": params, "updates": updates,
        "ours_s": t_ours, "baseline_s": t_base,
        "ours_GBps": moved / t_ours / 1e9, "baseline_GBps": moved / t_base / 1e9,
        "ratio": t_base / t_ours, "target": 0.8,
    }  # fmt: skip


# ------------------------------------------------------------------ transfer goodput


def bench_transfer(params: int, reps: int = 9) -> dict:
    """SubmitUpdate and FetchModel vs raw 1 MiB streams of the same bytes, same mTLS.

    The servers run here; the client runs in its own process, as a real client does,
    and interleaves fedmae and raw transfers (``benchmarks/transfer_client.py``).
    """
    fed = Federation(["c0"])
    layout = _layout(params)
    config = ServerConfig(
        state_dir=fed.work / "state", listen="127.0.0.1:0", certs_dir=fed.certs,
        policy=RoundPolicy(
            min_clients=1, rounds=0, round_timeout_s=600, retry_delay_s=0.05, min_participants=1
        ),
        training=TrainingConfig(model=f"blob:{params}"), max_requests_per_s=0,
        enroll_listen="off", exit_grace_s=0.1,
    )  # fmt: skip
    server = AggregatorServer(config)
    port = server.start()
    raw = RawStreamServer(fed.certs, encode(_delta(layout)))
    try:
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.transfer_client", "--port", str(port),
             "--raw-port", str(raw.port), "--identity", str(fed.ids["c0"]),
             "--params", str(params), "--reps", str(reps)],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"transfer client failed:\n{res.stderr[-2000:]}")
        t = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        raw.stop()
        server.stop(grace=0)
        fed.cleanup()
    size = layout.numel * 4
    up, raw_up = t["upload_s"], t["raw_upload_s"]
    down, raw_down = t["fetch_s"], t["raw_fetch_s"]
    return {
        "params": params, "bytes": size, "client": "separate process, interleaved with raw",
        "upload_s": up, "raw_upload_s": raw_up,
        "upload_MiBps": size / up / MiB, "raw_upload_MiBps": size / raw_up / MiB,
        "upload_ratio": raw_up / up,
        "fetch_s": down, "raw_fetch_s": raw_down,
        "fetch_MiBps": size / down / MiB, "raw_fetch_MiBps": size / raw_down / MiB,
        "fetch_ratio": raw_down / down, "target": 0.8,
    }  # fmt: skip


# ------------------------------------------------------------------ rounds


CLIENT_PROCESSES = 4  # benchmark clients are spread over this many processes


def bench_round(params: int, clients: int, rounds: int = 4, raw_MiBps: float | None = None) -> dict:
    """Seconds per round and the aggregator's peak RSS, clients sending a fixed delta
    (``benchmarks/round_clients.py``, in up to ``CLIENT_PROCESSES`` processes)."""
    run = run_rounds(params, clients, rounds)
    per_round = run.round_s
    model_bytes = params * 4
    in_flight = min(clients, 8)
    moved = 2 * clients * model_bytes  # every client downloads and uploads the model
    out = {
        "params": params, "clients": clients, "rounds": rounds,
        "round_s": per_round, "wall_s": run.wall_s,
        "peak_rss_MB": run.peak_rss / 1e6, "model_MB": model_bytes / 1e6,
        "rss_bound_MB": (model_bytes * (3 + in_flight) + 300e6) / 1e6,
    }  # fmt: skip
    if raw_MiBps:
        out["ideal_round_s"] = moved / (raw_MiBps * MiB)
        out["round_vs_ideal"] = per_round / out["ideal_round_s"]
    return out


@dataclass
class RoundsRun:
    """One aggregator process's run of rounds: its records, peak RSS, the clients' figures."""

    records: list[dict]
    peak_rss: int  # bytes
    wall_s: float
    sites: dict[str, dict]  # client id -> what round_clients reported

    @property
    def round_s(self) -> float:
        """Median round duration. The first round also warms connections and the page
        cache: the median is taken over the rounds after it (when there are any)."""
        timed = self.records[1:] if len(self.records) > 1 else self.records
        return statistics.median(r["duration_s"] for r in timed)


def run_rounds(
    params: int, clients: int, rounds: int, secure: bool = False, serve_args: tuple = ()
) -> RoundsRun:
    """``rounds`` rounds of ``clients`` clients sending a fixed delta to `fedmae serve` in
    its own process (with ``--secure-aggregation`` when ``secure``, and ``serve_args``)."""
    names = [f"c{i}" for i in range(clients)]
    fed = Federation(names)
    agg = AggregatorProcess(
        fed.work, fed.certs, f"blob:{params}", "--min-clients", str(clients),
        "--min-participants", str(min(clients, 3)), "--rounds", str(rounds),
        "--round-timeout", "600", "--max-workers", str(max(64, 2 * clients + 16)),
        *(["--secure-aggregation"] if secure else []), *serve_args,
    )  # fmt: skip
    procs: list[subprocess.Popen] = []
    sites: dict[str, dict] = {}
    try:
        _wait_port(agg)
        groups = min(clients, CLIENT_PROCESSES)
        t0 = time.perf_counter()
        for g in range(groups):
            ids = [str(fed.ids[n]) for n in names[g::groups]]
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.round_clients", "--port", str(agg.port),
                 "--params", str(params), "--rounds", str(rounds),
                 *(["--secure"] if secure else []), *ids],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))  # fmt: skip
        for proc in procs:
            out, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark clients failed:\n{err[-2000:]}")
            sites.update(json.loads(out.strip().splitlines()[-1]))
        wall = time.perf_counter() - t0
        _wait_records(agg.state, rounds)
        rss = agg.stop()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        if agg.proc.poll() is None:
            agg.stop()
    records = [json.loads(x) for x in (agg.state / "rounds.jsonl").read_text().splitlines()]
    fed.cleanup()
    return RoundsRun(records, rss, wall, sites)


def _wait_port(agg: AggregatorProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agg.proc.poll() is not None:
            raise RuntimeError("the aggregator exited during start-up")
        if "aggregator listening" in Path(agg.log.name).read_text():
            return
        time.sleep(0.2)
    raise RuntimeError("the aggregator did not start")


def _wait_records(state: Path, rounds: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = state / "rounds.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= rounds:
            return
        time.sleep(0.2)


# ------------------------------------------------------------------ encodings


def bench_encodings(rounds: int, clients: int, images: int, encodings: list[str]) -> dict:
    """Bytes per round and final losses of real MAE training, per update encoding."""
    results = {}
    for enc in encodings:
        state = Path(tempfile.mkdtemp(prefix=f"fedmae-bench-{enc}-"))
        res = subprocess.run(
            [sys.executable, "-m", "fedmae", "demo", "--clients", str(clients), "--rounds",
             str(rounds), "--images-per-client", str(images), "--encoding", enc,
             "--state-dir", str(state / "demo")],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"demo with {enc} failed:\n{res.stdout[-2000:]}")
        recs = [json.loads(x) for x in (state / "demo" / "rounds.jsonl").read_text().splitlines()]
        results[enc] = {
            "bytes_in_per_round": statistics.median(r["bytes_in"] for r in recs),
            "final_val_loss": recs[-1]["val_loss"],
            "final_eval_loss": recs[-1]["eval_loss"],
        }
        shutil.rmtree(state, ignore_errors=True)
    base = results.get("fp32")
    for r in results.values():
        if base:
            r["bytes_ratio"] = r["bytes_in_per_round"] / base["bytes_in_per_round"]
            r["eval_loss_ratio"] = r["final_eval_loss"] / base["final_eval_loss"]
    return results


# ------------------------------------------------------------------ local training


def bench_training(images: int, reps: int = 3) -> dict:
    """The agent's training loop vs a plain torch loop on the same model and data."""
    torch.set_num_threads(1)
    data = client_split(load_fashion_mnist(), 0, 1, seed=0, limit=images)
    x = data.train.to_tensor()
    cfg = TrainingConfig(local_epochs=1, batch_size=64)

    def ours():
        model = build_model("tiny", seed=0)
        train_local(model, make_optimizer(model, cfg.learning_rate), x, cfg, seed=0)

    def plain():
        model = build_model("tiny", seed=0)
        opt = make_optimizer(model, cfg.learning_rate)
        model.train()
        g = torch.Generator().manual_seed(0)
        for batch in batches(x, cfg.batch_size, shuffle=True, generator=g):
            loss, _, _ = model(batch, mask_ratio=cfg.mask_ratio)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    # Interleave the two so machine noise hits both alike.
    t_ours, t_plain = [], []
    for _ in range(reps):
        t_ours.append(median_time(ours, 1, warmup=0)[0])
        t_plain.append(median_time(plain, 1, warmup=0)[0])
    o, p = statistics.median(t_ours), statistics.median(t_plain)
    return {
        "images": len(x), "ours_img_s": len(x) / o, "plain_img_s": len(x) / p,
        "overhead": o / p - 1, "target_overhead": 0.05,
    }  # fmt: skip
